"""Resilience policies, one module each; `sidecar.pipeline` composes them in a fixed order.

The gates (`ratelimit`, `bulkhead`, `breaker`) share one shape: `admit` a call and get a
`base.Permit`, then `release` it with the call's `Outcome`. `deadline`, `retry` and
`fallback` shape the control flow around them.
"""
