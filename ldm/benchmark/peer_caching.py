"""The peer with the fewer-FLOPs methods: diffusers' pipeline run through the reference packages.

- DeepCache: ``deepcache``'s ``DeepCacheSDHelper`` (interval, branch).
- T-GATE: ``tgate``'s ``TgateSDLoader`` / ``TgateSDDeepCacheLoader`` (with DeepCache). PyPI's tgate 1.0 is
  TGATE-V2, which also caches self-attention; ``sp_interval=1, fi_interval=1`` leaves the paper's method,
  ours. Its pipeline numbers the gate in steps after PNDM's warm-up, as ours counts steps.
- Guidance that stops early: diffusers' own ``SDCFGCutoffCallback`` after the last guided UNet call (PNDM's
  first step makes two calls, so call index ``guided_steps`` is the last guided one).
T-GATE with an earlier ``cfg_end`` has no reference: the tgate pipeline feeds the negative prompt to the
UNet once the callback turns guidance off. The packages patch the pipeline's modules in place, so a
pipeline takes one method setting for its lifetime. They are imported inside the function that needs them.
"""

from __future__ import annotations

from typing import Any, Callable


def reference_call(pipe, caching, steps: int) -> Callable[..., Any]:
    """``pipe``'s call (pipeline keyword arguments -> its output) with ``caching``'s methods from the reference
    packages; ``caching`` None: the plain pipeline. ``steps``: the run's step count (for the guidance end)."""
    if caching is None:
        return pipe
    guided = caching.guided_steps(steps)
    if caching.tgate is not None:
        if guided < caching.tgate:
            raise ValueError("the tgate package cannot stop guidance before its gate (--cfg_end earlier than "
                             "--tgate): no reference for this setting")
        if caching.deepcache is not None:
            from tgate import TgateSDDeepCacheLoader
            pipe = TgateSDDeepCacheLoader(pipe, cache_interval=caching.deepcache, cache_branch_id=caching.branch)
        else:
            from tgate import TgateSDLoader
            pipe = TgateSDLoader(pipe)
        return lambda **kw: pipe.tgate(**kw, gate_step=caching.tgate, sp_interval=1, fi_interval=1, warm_up=0)
    if caching.deepcache is not None:
        from DeepCache import DeepCacheSDHelper
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=caching.deepcache, cache_branch_id=caching.branch)
        helper.enable()
    if guided < steps:
        from diffusers.callbacks import SDCFGCutoffCallback
        callback = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=guided)
        return lambda **kw: pipe(**kw, callback_on_step_end=callback)
    return pipe
