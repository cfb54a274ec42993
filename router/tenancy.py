"""The router's per-tenant admission and accounting (issue 17), called from router/service.py Generate.

    grant = await router.tenancy.admit(context, v, n_prompt_tokens)   # PERMISSION_DENIED / RESOURCE_EXHAUSTED
    router.tenancy.fill(breq, grant)                                  # BatchRequest.tenant, weight, class
    grant.first_token(); grant.finish(usage)                          # in the stream's loop / `finally`

A request is charged prompt + max_tokens against the tenant's tokens_per_minute when admitted (nothing
is queued unless it fits); what it did not generate is refunded when it ends. Refusals happen before
anything is published, answer RESOURCE_EXHAUSTED with `retry-after-ms` trailing metadata, and touch
only the tenant's own state, so other tenants do not notice.
Usage for `switchyard tenants` is kept per minute for the last hour (UsageWindow), per router replica.
"""
from __future__ import annotations

import logging
import time
from collections import deque

import grpc

from protos.switchyard.v1 import inference_pb2
from router.quotas import Quotas
from router.tenants import Tenant, TenantTable, current_tenant

log = logging.getLogger("switchyard.router.tenancy")

WINDOW_S = 3600
SLOT_S = 60


class _Minute:
    __slots__ = ("t", "requests", "prompt", "completion", "rejections", "queue_s", "finished", "gpu_usd", "api_usd")

    def __init__(self, t: int):
        self.t = t
        self.requests = self.prompt = self.completion = self.finished = 0
        self.queue_s = self.gpu_usd = self.api_usd = 0.0
        self.rejections: dict[str, int] = {}


class UsageWindow:
    """One tenant's counts per minute over the last hour."""

    def __init__(self):
        self.minutes: deque[_Minute] = deque()

    def now(self) -> _Minute:
        t = int(time.time()) // SLOT_S
        if not self.minutes or self.minutes[-1].t != t:
            self.minutes.append(_Minute(t))
            while self.minutes[0].t <= t - WINDOW_S // SLOT_S:
                self.minutes.popleft()
        return self.minutes[-1]

    def total(self) -> _Minute:
        self.now()   # drops minutes that left the window
        out = _Minute(0)
        for m in self.minutes:
            out.requests += m.requests
            out.prompt += m.prompt
            out.completion += m.completion
            out.finished += m.finished
            out.queue_s += m.queue_s
            out.gpu_usd += m.gpu_usd
            out.api_usd += m.api_usd
            for k, v in m.rejections.items():
                out.rejections[k] = out.rejections.get(k, 0) + v
        return out


class Grant:
    """One admitted request's share of its tenant's quotas; released exactly once."""
    __slots__ = ("tenancy", "tenant", "service_class", "reserved", "queued", "done")

    def __init__(self, tenancy: "Tenancy", tenant: Tenant, service_class: str, reserved: int):
        self.tenancy = tenancy
        self.tenant = tenant
        self.service_class = service_class
        self.reserved = reserved        # rate tokens charged (prompt + max_tokens)
        self.queued = True
        self.done = False

    def first_token(self) -> None:
        if self.queued:
            self.queued = False
            t = self.tenant
            if t.max_streams or t.max_queued:
                self.tenancy.quotas.first_token(t.name)

    def finish(self, usage=None) -> None:
        """The stream ended (usage: the final chunk's Usage, None when it failed or was cancelled)."""
        if self.done:
            return
        self.done = True
        self.tenancy.finished(self, usage)


class Tenancy:
    def __init__(self, cfg, served: bool = False):
        from prometheus_client import REGISTRY, CollectorRegistry

        from telemetry.metrics import TenantMetrics
        self.cfg = cfg
        self.table = TenantTable(cfg)
        self.metrics = TenantMetrics(REGISTRY if served else CollectorRegistry())
        self.quotas = Quotas()
        self.usage: dict[str, UsageWindow] = {}
        self.open: dict[str, int] = {}

    async def start(self, nc) -> None:
        """Share quota state through JetStream KV when there is a tenant with quotas (and NATS has it)."""
        if not self.cfg.quota_shared or nc is None or not any(t.has_quota for t in self._all()):
            return
        from router.quotas import JetStreamKv
        try:
            self.quotas.kv = await JetStreamKv.open(nc)
        except Exception as e:   # no JetStream on this server: quotas hold per router only
            log.warning("quotas: NATS JetStream KV unavailable (%r); quotas are per router replica", e)

    async def stop(self) -> None:
        await self.quotas.close()

    def _all(self) -> list[Tenant]:
        return [*self.table.by_name.values(), self.table.default]

    def window(self, tenant: str) -> UsageWindow:
        w = self.usage.get(tenant)
        if w is None:
            w = self.usage[tenant] = UsageWindow()
        return w

    def reject(self, tenant: str, reason: str) -> None:
        self.metrics.rejections.labels(tenant, reason).inc()
        m = self.window(tenant).now()
        m.rejections[reason] = m.rejections.get(reason, 0) + 1

    def unauthenticated(self, code) -> None:
        """A caller refused by the authorizer (no tenant known): counted under tenant ""."""
        self.metrics.rejections.labels("", "unauthenticated" if code == grpc.StatusCode.UNAUTHENTICATED
                                       else "permission").inc()

    # ---- admission ------------------------------------------------------------------------------
    def service_class(self, requested: str) -> str:
        """The class a request of the current caller runs in (its tenant's default when it may not use
        the one requested)."""
        return (current_tenant() or self.table.default).service_class(requested)

    async def admit(self, context, v, n_prompt: int, service_class: str = "") -> Grant:
        """Check the caller's tenant may run this request and take its quotas; aborts the RPC otherwise.
        v: router.validation.ValidRequest (model and adapter resolved)."""
        t = current_tenant()
        if t is None:   # not served through the authorizer (in-process tests), or an admin token
            t = self.table.default
        if not t.may_use_model(v.model):
            self.reject(t.name, "permission")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"tenant {t.name!r} may not use model {v.model!r}; allowed: {', '.join(t.models)}")
        if v.adapter_id and not t.may_use_adapter(v.adapter_id):
            self.reject(t.name, "permission")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"tenant {t.name!r} may not use adapter {v.adapter_id!r}")
        max_tokens = int(v.sampling.max_tokens)
        if t.max_tokens and max_tokens > t.max_tokens:
            self.reject(t.name, "max_tokens")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"sampling.max_tokens {max_tokens} is over tenant {t.name!r}'s limit of "
                                f"{t.max_tokens}; ask for fewer")
        cost = n_prompt + max_tokens
        if t.tokens_per_minute and cost > t.tokens_per_minute:
            self.reject(t.name, "tokens_per_minute")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"this request needs {cost} tokens (prompt {n_prompt} + max_tokens {max_tokens}), "
                                f"more than tenant {t.name!r}'s whole quota of {t.tokens_per_minute} per minute")
        slots = bool(t.max_streams or t.max_queued)
        refusal = None
        try:
            if slots:
                refusal = await self.quotas.open_stream(t.name, t.max_streams, t.max_queued)
            if refusal is None and t.tokens_per_minute:
                refusal = await self.quotas.take_tokens(t.name, cost, t.tokens_per_minute)
                if refusal is not None and slots:
                    self.quotas.close_stream(t.name, queued=True)
        except Exception as e:   # the shared quota state is unreachable: refuse rather than overspend
            log.warning("quota state unavailable: %r", e)
            self.reject(t.name, "quota_unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the quota state (NATS KV) is unreachable; retry")
        if refusal is not None:
            await self._refuse(context, t, refusal)
        g = Grant(self, t, t.service_class(service_class), cost)
        self.metrics.requests.labels(t.name, g.service_class).inc()
        self.window(t.name).now().requests += 1
        n = self.open[t.name] = self.open.get(t.name, 0) + 1
        self.metrics.streams.labels(t.name).set(n)
        return g

    async def _refuse(self, context, t: Tenant, refusal) -> None:
        self.reject(t.name, refusal.reason)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message,
                            trailing_metadata=(("retry-after-ms", str(refusal.retry_after_ms)),))

    @staticmethod
    def fill(breq, g: Grant, priority: int | None = None) -> None:
        """The tenant's fields of a BatchRequest (the batcher's fair shares read them); the priority is
        clamped to the tenant's ceiling."""
        breq.tenant = g.tenant.name
        breq.tenant_weight = g.tenant.weight
        breq.service_class = g.service_class
        if breq.priority > g.tenant.priority_ceiling:
            breq.priority = g.tenant.priority_ceiling

    def finished(self, g: Grant, usage) -> None:
        t = g.tenant
        n = self.open[t.name] = max(0, self.open.get(t.name, 1) - 1)
        self.metrics.streams.labels(t.name).set(n)
        if t.max_streams or t.max_queued:
            self.quotas.close_stream(t.name, queued=g.queued)
        used = 0
        if usage is not None:
            used = int(usage.prompt_tokens) + int(usage.completion_tokens)
            self._account(t.name, usage)
        if t.tokens_per_minute:
            # Charged prompt + max_tokens; a request that failed before producing anything costs nothing.
            self.quotas.refund(t.name, g.reserved - used if usage is not None else
                               (g.reserved if g.queued else 0), t.tokens_per_minute)

    def _account(self, tenant: str, u) -> None:
        m = self.metrics
        pin, pout = int(u.prompt_tokens), int(u.completion_tokens)
        api = (pin * self.cfg.api_usd_per_1m_input + pout * self.cfg.api_usd_per_1m_output) / 1e6
        m.tokens.labels(tenant, "input").inc(pin)
        m.tokens.labels(tenant, "output").inc(pout)
        m.cost.labels(tenant, "gpu").inc(max(0.0, float(u.cost_usd)))
        m.cost.labels(tenant, "api").inc(api)
        m.queue_time.labels(tenant).observe(max(0.0, float(u.queue_ms)) / 1000.0)
        w = self.window(tenant).now()
        w.prompt += pin
        w.completion += pout
        w.finished += 1
        w.queue_s += max(0.0, float(u.queue_ms)) / 1000.0
        w.gpu_usd += max(0.0, float(u.cost_usd))
        w.api_usd += api

    # ---- Admin/TenantUsage ---------------------------------------------------------------------------
    async def tenant_usage(self, request, context) -> inference_pb2.TenantUsageResponse:
        caller = current_tenant()
        admin = self.table.mode == "off" or caller is None
        names = self.table.names() if admin else [caller.name]
        if request.tenant:
            if request.tenant not in names:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED if not admin else grpc.StatusCode.NOT_FOUND,
                                    f"no usage of tenant {request.tenant!r} visible to this caller")
            names = [request.tenant]
        resp = inference_pb2.TenantUsageResponse(window_s=WINDOW_S, router_id=self.quotas.router_id,
                                                 auth=self.table.mode)
        for name in names:
            t = self.table.get(name) or self.table.default
            tot = self.window(name).total()
            row = resp.tenants.add(tenant=name, weight=t.weight, requests=tot.requests, prompt_tokens=tot.prompt,
                                   completion_tokens=tot.completion, gpu_usd=tot.gpu_usd, api_usd=tot.api_usd,
                                   queue_seconds_mean=tot.queue_s / tot.finished if tot.finished else 0.0,
                                   open_streams=self.open.get(name, 0), tokens_per_minute=t.tokens_per_minute,
                                   max_streams=t.max_streams)
            for k, v in tot.rejections.items():
                row.rejections[k] = v
        return resp
