"""JAX, imported on first use: `import spa` (and `import spa.engine`) must work without it."""
from __future__ import annotations

from ..errors import UsageError


class _Jax:
    """The jax modules, filled in by `load()` (one object, so op modules can bind it early)."""

    jax = jnp = lax = None


J = _Jax()


def load() -> _Jax:
    if J.jax is None:
        try:
            import jax
            import jax.numpy as jnp
            from jax import lax
        except ImportError as exc:
            raise UsageError(f"the gradient engine (spa.engine) needs JAX: "
                             f"pip install 'spa-prune[jax]' ({exc})") from exc
        J.jax, J.jnp, J.lax = jax, jnp, lax
    return J
