"""Inference-time interventions on the residual stream, as context managers.

Every hook returns a new tensor (never edits in place) and every context manager removes its hooks in
``finally``, so an exception inside the block leaves the model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from refusalkit.models.adapters import Arch

# The real-token mask of the batch being run, when the caller knows it (see ``token_mask``). Activation
# addition reads it so that pad positions are never steered.
_TOKEN_MASK: ContextVar[torch.Tensor | None] = ContextVar("refusalkit_token_mask", default=None)


@contextmanager
def token_mask(mask: torch.Tensor) -> Iterator[None]:
    """Declare the [batch, seq] real-token mask of the forward passes run inside the block."""
    tok = _TOKEN_MASK.set(mask)
    try:
        yield
    finally:
        _TOKEN_MASK.reset(tok)


def get_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a decoder block was called with (positionally or by keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], h: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _map_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"cannot intervene on a module output of type {type(output).__name__}")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype hooks compute in for activations of ``dtype``: float32 at least.

    Under bfloat16 or float16 the direction is not rounded to the model dtype: a bf16 unit vector is
    off by ~2^-9 per entry, which alone leaves a component along the direction as large as the
    output's own rounding. Only the hook's result is rounded back, once.
    """
    return torch.promote_types(dtype, torch.float32)


class _PerDevice:
    """A vector cached per (device, working dtype), so hooks on sharded models use a local copy."""

    def __init__(self, vector: torch.Tensor) -> None:
        self.vector = vector.detach()
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def on(self, like: torch.Tensor) -> torch.Tensor:
        """The vector on ``like``'s device, in ``work_dtype(like.dtype)`` (never below float32)."""
        key = (like.device, work_dtype(like.dtype))
        if key not in self._cache:
            self._cache[key] = self.vector.to(device=key[0], dtype=key[1])
        return self._cache[key]


def project_out(x: torch.Tensor, unit: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x - scale (x . u) u over the last dimension, computed in float32 at least; one rounding to x.dtype.

    ``unit`` should already be in ``work_dtype(x.dtype)`` (``_PerDevice.on`` gives it so); a unit in
    the model's half precision would be rounded before the projection.
    """
    work = work_dtype(x.dtype)
    xf = x.to(work)
    u = unit.to(work)
    coef = xf @ u
    if scale != 1.0:
        coef = scale * coef
    return (xf - coef[..., None] * u).to(x.dtype)


def unit(direction: torch.Tensor, min_norm: float = 0.0) -> torch.Tensor:
    """``direction`` / its norm, in float64 (the one unit-vector helper of hooks and weight edits).

    Raises ValueError when the direction is not finite or its norm is at most ``min_norm``.
    """
    d = direction.detach().to(torch.float64)
    norm = d.norm()
    if not torch.isfinite(norm) or norm <= min_norm:
        raise ValueError(f"direction must be finite and non-zero (norm above {min_norm:g})")
    return d / norm


@contextmanager
def hooks(registrations: list[Callable[[], RemovableHandle]]) -> Iterator[None]:
    """Register hooks on entry and always remove them on exit."""
    handles: list[RemovableHandle] = []
    try:
        for register in registrations:
            handles.append(register())
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pre_hook(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _with_hidden(args, kwargs, fn(get_hidden(args, kwargs)))

    return hook


def _out_hook(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        return _map_output(output, fn)

    return hook


def register_pre(module: nn.Module, hook: Callable[..., Any]) -> Callable[[], RemovableHandle]:
    """A deferred registration of ``hook`` as a forward pre-hook (with kwargs) on ``module``."""

    def register() -> RemovableHandle:
        return module.register_forward_pre_hook(hook, with_kwargs=True)

    return register


def register_out(module: nn.Module, hook: Callable[..., Any]) -> Callable[[], RemovableHandle]:
    """A deferred registration of ``hook`` as a forward hook on ``module``."""

    def register() -> RemovableHandle:
        return module.register_forward_hook(hook)

    return register


@contextmanager
def ablate_direction(arch: Arch, direction: torch.Tensor) -> Iterator[None]:
    """Directional ablation: remove the component along ``direction`` (normalized here) from every
    block's input and from every attention and MLP write, at every position.

    direction: [d_model]. With the block inputs and both sublayer writes projected, the residual
    stream holds no component along the direction anywhere, including the final block's output: exactly
    in float32 up to rounding, and in bfloat16/float16 within one rounding of the model dtype,
    |h . u| <= 2^-8 |h| (bf16) or 2^-11 |h| (fp16), since the projection runs in float32 and only its
    result is rounded (tests/test_interventions.py).
    """
    u = _PerDevice(unit(direction))

    def ablate(x: torch.Tensor) -> torch.Tensor:
        return project_out(x, u.on(x))

    regs: list[Callable[[], RemovableHandle]] = []
    for block in arch.blocks:
        regs.append(register_pre(block, _pre_hook(ablate)))
    for mod in [*arch.attn_write, *arch.mlp_write]:
        regs.append(register_out(mod, _out_hook(ablate)))
    with hooks(regs):
        yield


@contextmanager
def project_outputs(writes: list[tuple[nn.Module, torch.Tensor, float]]) -> Iterator[None]:
    """Each listed module's output y becomes y - s (y.u) u, for its (module, direction, s); u is the
    direction normalized. The hook equivalent of a weight edit (``edits.Target``), weights untouched."""

    def make(direction: torch.Tensor, scale: float) -> Callable[..., Any]:
        u = _PerDevice(unit(direction))
        return _out_hook(lambda x: project_out(x, u.on(x), scale))

    with hooks([register_out(module, make(direction, scale)) for module, direction, scale in writes]):
        yield


@contextmanager
def add_direction(arch: Arch, vector: torch.Tensor, layer: int, coeff: float = 1.0) -> Iterator[None]:
    """Activation addition: resid_pre[layer] += coeff * vector at every real (non-pad) position.

    vector: [d_model], used as given (the paper adds the raw difference in means, not a unit vector).
    """
    if not 0 <= layer < arch.n_layers:
        raise ValueError(f"layer {layer} out of range 0..{arch.n_layers - 1}")
    v = _PerDevice(vector.double() * coeff)

    def add(x: torch.Tensor) -> torch.Tensor:
        delta = v.on(x)  # float32 at least: the sum is rounded to the model dtype once
        mask = _TOKEN_MASK.get()
        if mask is not None and mask.shape[0] == x.shape[0] and mask.shape[1] >= x.shape[1]:
            m = mask[:, -x.shape[1] :].to(device=x.device, dtype=delta.dtype)
            return (x.to(delta.dtype) + m[..., None] * delta).to(x.dtype)
        return (x.to(delta.dtype) + delta).to(x.dtype)

    block = arch.blocks[layer]
    with hooks([register_pre(block, _pre_hook(add))]):
        yield


@contextmanager
def capture_resid_pre(
    arch: Arch, layers: list[int], sink: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``sink(layer, resid_pre)`` for each listed layer during forward passes inside the block.

    The sink sees the tensor after any pre-hooks registered earlier (e.g. an ablation), because
    PyTorch runs pre-hooks in registration order.
    """

    def make(layer: int) -> Callable[..., Any]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sink(layer, get_hidden(args, kwargs))

        return hook

    regs = [register_pre(arch.blocks[layer], make(layer)) for layer in layers]
    with hooks(regs):
        yield


class RowSteering:
    """Per-row interventions for batched passes that mix settings: each batch row has its own
    ablation direction (a zero row: no ablation) and its own addition vector at one layer (a zero
    row: no addition), so baseline, ablation and actadd rows share a forward pass and the weights are
    read once for all of them (what makes batched generation on a CPU cheap).

    ``kinds`` are the distinct settings ([k, d_model] unit directions or zeros, [k, d_model] addition
    vectors or zeros, or no additions at all); ``use(kind_of_row)`` says which kind each row of the next
    passes is. Selection uses it with one kind per candidate direction, several candidates per pass. A row of
    kind ``i`` computes what ``ablate_direction`` / ``add_direction`` compute for that setting alone,
    the same operations in the same precision, up to the matmul's batch-dependent rounding.
    """

    def __init__(
        self, units: torch.Tensor, additions: torch.Tensor | None = None, layer: int | None = None
    ) -> None:
        if units.ndim != 2 or (additions is not None and additions.shape != units.shape):
            raise ValueError("units (and additions, if any) must be [kinds, d_model]")
        if (additions is None) != (layer is None):
            raise ValueError("additions need the layer they are added at")
        self.units = units.double()
        self.layer = layer
        self._unit_rows = _PerDevice(self.units)
        self._add_rows = _PerDevice(additions.double()) if additions is not None else None
        self._rows: torch.Tensor = torch.arange(units.shape[0])
        self._gathered: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def n_kinds(self) -> int:
        return int(self.units.shape[0])

    def use(self, kind_of_row: torch.Tensor | list[int]) -> None:
        """Set the kind of each row of the passes that follow ([batch] kind indices)."""
        self._rows = torch.as_tensor(kind_of_row, dtype=torch.long)
        self._gathered.clear()

    def _per_row(self, which: str, table: _PerDevice, x: torch.Tensor) -> torch.Tensor:
        """[b, 1, d]: ``table``'s vector for each row's kind, gathered once per ``use`` (hooks run
        about 3 x n_layers times a pass)."""
        key = (which, x.device, work_dtype(x.dtype))
        if key not in self._gathered:
            self._gathered[key] = table.on(x)[self._rows.to(x.device)][:, None, :]
        return self._gathered[key]

    def _ablate(self, x: torch.Tensor) -> torch.Tensor:
        u = self._per_row("units", self._unit_rows, x)
        xf = x.to(u.dtype)
        return (xf - (xf * u).sum(-1, keepdim=True) * u).to(x.dtype)

    def _add(self, x: torch.Tensor) -> torch.Tensor:
        assert self._add_rows is not None
        delta = self._per_row("additions", self._add_rows, x)
        mask = _TOKEN_MASK.get()
        if mask is not None and mask.shape[0] == x.shape[0] and mask.shape[1] >= x.shape[1]:
            delta = mask[:, -x.shape[1] :].to(device=x.device, dtype=delta.dtype)[..., None] * delta
        return (x.to(delta.dtype) + delta).to(x.dtype)

    @contextmanager
    def active(self, arch: Arch) -> Iterator[RowSteering]:
        """The hooks, registered for the block (ablation points of ``ablate_direction``, the addition
        point of ``add_direction``; addition runs after the block input's ablation)."""
        regs = [register_pre(block, _pre_hook(self._ablate)) for block in arch.blocks]
        regs += [register_out(mod, _out_hook(self._ablate)) for mod in [*arch.attn_write, *arch.mlp_write]]
        if self.layer is not None:
            if not 0 <= self.layer < arch.n_layers:
                raise ValueError(f"layer {self.layer} out of range 0..{arch.n_layers - 1}")
            regs.append(register_pre(arch.blocks[self.layer], _pre_hook(self._add)))
        with hooks(regs):
            yield self
