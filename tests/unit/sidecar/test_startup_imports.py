"""What the sidecar imports at start-up: nothing it does not use (issue 8: start-up time)."""

from __future__ import annotations

import subprocess
import sys


def imported_after(code: str) -> set[str]:
    """Modules loaded by a fresh interpreter after running `code` (top-level packages and
    full names)."""
    names = "{*sys.modules, *(m.split('.')[0] for m in sys.modules)}"
    probe = f"{code}\nimport sys\nprint(' '.join({names}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    return set(out.stdout.split())


def test_the_server_does_not_import_redis_until_shared_state_needs_it() -> None:
    loaded = imported_after("import sidecar.server, sidecar.policies.breaker as b\n"
                            "assert b.pybreaker.CircuitBreaker")  # fmt: skip
    assert "pybreaker" in loaded and "sidecar" in loaded
    assert "redis" not in loaded
    # the generated messages only, not the SDK (its package loads a module at first use)
    assert "tether.v1.sidecar_pb2" in loaded
    assert not {"tether._agents", "tether._async_client", "tether._client"} & loaded


def test_redis_still_loads_for_shared_state() -> None:
    loaded = imported_after(
        "import sidecar.server\n"
        "from sidecar.state.store import _client\n"
        "_client('redis://127.0.0.1:1/0', 0.1)"
    )
    assert "redis" in loaded
