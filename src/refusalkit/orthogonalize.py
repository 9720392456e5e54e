"""Weight orthogonalization (PAPER.md section 5): bake directional ablation into the weights.

Every matrix that writes into the residual stream is projected off the unit direction u:
  embedding rows (and learned position embeddings)  E <- E - (E u) u^T
  attention / MLP output projections (nn.Linear, weight [d_model, d_in])  W <- W - u (u^T W),  b <- b - (b.u) u
With every write projected, the residual never gains a component along u, which is what the ablation
hooks enforce; the logits match up to floating-point error. A tied output head is untied first and keeps
the original embedding, since the paper leaves the head unchanged.

Precision (edits.project): float32 products from the float64 unit vector, rounded once to the
parameter's dtype; the hooks project the same way (``interventions.project_out``). In float32 the two
agree to ~1e-4 of the largest logit (tests/test_orthogonalize.py), and the weights are within float32
rounding of a float64 edit. In half precision each side carries one rounding of the dtype, so they agree
only as closely as the dtype allows: on the tiny test models the largest logit difference is <= 1.8% of
the largest logit in bfloat16 and <= 0.25% in float16 (tested against 4% and 0.5%), about the size of
the half-precision model's own difference from float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from refusalkit.edits import Target, apply, edited, target
from refusalkit.models.adapters import Arch
from refusalkit.models.loading import LoadedModel


def targets(arch: Arch, direction: torch.Tensor) -> list[Target]:
    """The paper's edit: every embedding and every attention / MLP output projection, scale 1."""
    parts: list[Target] = [target(arch, "embed", direction)]
    if arch.pos_embed is not None:
        parts.append(target(arch, "pos_embed", direction))
    for layer in range(arch.n_layers):
        parts += [target(arch, "attn", direction, layer=layer), target(arch, "mlp", direction, layer=layer)]
    return parts


def orthogonalize_weights(lm: LoadedModel, direction: torch.Tensor) -> None:
    """Edit ``lm``'s weights in place so that no residual write has a component along ``direction``.

    direction: [d_model]. Each edit runs on the parameter's own device (works with device_map="auto").
    """
    apply(lm, targets(lm.arch, direction))


@contextmanager
def orthogonalized(lm: LoadedModel, direction: torch.Tensor) -> Iterator[LoadedModel]:
    """Orthogonalize the weights for the duration of the block, then restore them bit for bit.

    Costs one copy of the edited matrices (embedding and output projections) in host memory.
    """
    with edited(lm, targets(lm.arch, direction)) as model:
        yield model


def save_folder(
    lm: LoadedModel,
    out: str | Path,
    *,
    extra: dict[str, str] | None = None,
    keep: Callable[[Path], bool] | None = None,
) -> Path:
    """Save ``lm`` as it is now (e.g. inside an edit's context) as an ordinary transformers folder.

    Written beside ``out`` and renamed into place, so an interrupted save never leaves a partial folder.
    ``extra`` files (name -> text) are written into it; files of an existing folder for which ``keep``
    is true (a model card, a control vector) are carried over.
    """
    import os
    import shutil

    out = Path(out)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    if out.exists():
        for p in [p for p in out.iterdir() if keep is not None and keep(p)]:
            os.replace(p, tmp / p.name)
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_checkpoint(lm: LoadedModel, direction: torch.Tensor, out: str | Path) -> Path:
    """Save an orthogonalized copy of the model as an ordinary transformers checkpoint folder.

    The folder loads with plain ``AutoModelForCausalLM.from_pretrained`` (no refusalkit needed); the live
    model is restored afterwards.
    """
    with orthogonalized(lm, direction):
        return save_folder(lm, out)
