"""The peer with the fewer-FLOPs methods: diffusers' pipeline run through the reference packages.

- DeepCache: ``deepcache``'s ``DeepCacheSDHelper`` (interval, branch).
- T-GATE: ``tgate``'s ``TgateSDLoader`` / ``TgateSDDeepCacheLoader`` (with DeepCache). PyPI's tgate 1.0 is
  TGATE-V2, which also caches self-attention; ``sp_interval=1, fi_interval=1`` leaves the paper's method,
  ours. Its pipeline numbers the gate in steps after PNDM's warm-up, as ours counts steps.
- Guidance that stops early: a step-end callback after the last guided UNet call (PNDM's first step makes two
  calls, so call index ``guided_steps`` is the last guided one) that keeps the conditional half of the prompt
  embeddings and sets the guidance scale to 0, as diffusers' ``SDCFGCutoffCallback`` does for one image
  (which keeps only the last row, so cannot serve a batch; the tests compare ours with it directly).
No reference exists for two settings, refused with a ValueError: T-GATE with an earlier ``cfg_end`` (the tgate
pipeline feeds the negative prompt alone once guidance is off) and DeepCache with ``cfg_end`` (the package does
not start over when the batch halves: its next shallow call mixes a 2B feature with B skips). The packages patch
the pipeline's modules in place; ``reference_call``'s undo puts back exactly what was there. They are imported
inside the function that needs them.
"""

from __future__ import annotations

from typing import Any, Callable


def _snapshot(unet) -> list[tuple[Any, Any, bool]]:
    """(module, its instance-level forward or None, whether it had a ``cache`` attribute) for ``unet``'s modules."""
    return [(m, vars(m).get("forward"), "cache" in vars(m)) for m in unet.modules()]


def _undo(snapshot: list[tuple[Any, Any, bool]]) -> None:
    """Put back the instance ``forward`` attributes of ``snapshot`` and drop the ``cache`` tensors added since."""
    for module, forward, had_cache in snapshot:
        if forward is not None:
            module.forward = forward
        elif "forward" in vars(module):
            del module.forward
        if not had_cache and "cache" in vars(module):
            del module.cache  # tgate's kept attention outputs: memory, and stale for the next method


def cfg_cutoff(guided_steps: int) -> Callable:
    """A step-end callback that turns guidance off after UNet call ``guided_steps`` (the conditional half kept)."""
    def callback(pipeline, step_index: int, timestep, kwargs: dict) -> dict:
        if step_index == guided_steps:
            pipeline._guidance_scale = 0.0
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[1]  # [uncond; cond] -> cond
        return kwargs
    return callback


def reference_call(pipe, caching, steps: int) -> tuple[Callable[..., Any], Callable[[], None]]:
    """(``pipe``'s call with ``caching``'s methods from the reference packages, the undo that restores ``pipe``);
    ``caching`` None: the plain pipeline. ``steps``: the run's step count (for the guidance end)."""
    snapshot = _snapshot(pipe.unet)
    undo = lambda: _undo(snapshot)
    if caching is None:
        return pipe, undo
    guided = caching.guided_steps(steps)
    if caching.tgate is not None:
        if guided < caching.tgate:
            raise ValueError("no reference for guidance that stops before the T-GATE gate: the tgate package feeds "
                             "the negative prompt alone there")
        if caching.deepcache is not None:
            from tgate import TgateSDDeepCacheLoader
            pipe = TgateSDDeepCacheLoader(pipe, cache_interval=caching.deepcache, cache_branch_id=caching.branch)
        else:
            from tgate import TgateSDLoader
            pipe = TgateSDLoader(pipe)
        call = lambda **kw: pipe.tgate(**kw, gate_step=caching.tgate, sp_interval=1, fi_interval=1, warm_up=0)
        return call, undo
    if caching.deepcache is not None and guided < steps:
        raise ValueError("no reference for DeepCache with --cfg_end: the deepcache package does not start over when "
                         "the UNet batch halves")
    if caching.deepcache is not None:
        from DeepCache import DeepCacheSDHelper
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=caching.deepcache, cache_branch_id=caching.branch)
        helper.enable()
    if guided < steps:
        callback = cfg_cutoff(guided)
        return (lambda **kw: pipe(**kw, callback_on_step_end=callback,
                                  callback_on_step_end_tensor_inputs=["prompt_embeds"])), undo
    return pipe, undo
