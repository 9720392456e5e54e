"""One loaded model that answers under a setting: original, edited, ablation hooks or activation addition.

There is one copy of the model in memory. What each setting means:

- ``original``: no intervention.
- ``edited``: the run's active edit (``run.RunFolder.active_edit``: the search's choice when
  search/chosen.json exists, else the run's direction projected out of the weights), or the edit
  ``--edit`` names; the same edit `refusalkit export` writes. The weight edit is applied when an edited answer is first
  asked for and kept until an answer under another setting needs the original weights, then restored
  bit for bit: a conversation with the edited model pays for the edit once, not per answer. Weights,
  not the ablation hooks, because what you talk to should be exactly the checkpoint you would keep.
  For architectures whose weights cannot be edited exactly (Gemma 2/3), ``edited`` means the ablation
  hooks and says so in its label.
- ``ablation``: the directional-ablation hooks (``ablate_direction``), applied per answer.
- ``add``: activation addition of ``coeff`` times the direction at its layer (``add_direction``); +1
  strengthens refusal, -1 weakens it (the paper's induce and bypass settings).

Answers are greedy and streamed piece by piece from a manual decoding loop with a KV cache, so an
interrupted answer leaves no thread behind and every hook is removed when the stream is closed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from refusalkit.activations import cache_kwarg, cache_of
from refusalkit.chat.options import Setting
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.generation import eos_ids
from refusalkit.interventions import ablate_direction, add_direction
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import encode
from refusalkit.run import ActiveEdit, RunFolder

if TYPE_CHECKING:
    from refusalkit.report.active_edit import EditNumbers

Message = dict[str, str]  # {"role": "user" | "assistant", "content": ...}


EditFactory = Callable[[], AbstractContextManager[Any]]


@dataclass
class WeightEdit:
    """A reversible weight edit: ``apply()`` is a context manager that edits on entry, restores on exit."""

    label: str
    apply: EditFactory


class ChatModel:
    """The loaded model, the run's direction and the edit; answers one request at a time.

    ``active``: which edit ``edited`` is (default: the direction, orthogonalized); ``run``: the run
    folder it came from (its measured numbers are read from there)."""

    def __init__(
        self,
        lm: LoadedModel,
        direction: Direction,
        *,
        system_prompt: str | None = None,
        active: ActiveEdit | None = None,
        run: RunFolder | None = None,
    ) -> None:
        d_model = int(lm.model.get_input_embeddings().weight.shape[1])
        if direction.vector.shape[0] != d_model:
            raise RefusalkitError(
                f"the direction has d_model {direction.vector.shape[0]} but {lm.name} has {d_model}; "
                "use the run folder the direction was selected in"
            )
        self.lm = lm
        self.direction = direction
        self.system_prompt = system_prompt
        self.active = active or ActiveEdit("direction", direction)
        self.run = run
        self.edit: WeightEdit | None = None
        if self.active.kind != "direction" or lm.arch.spec.weights_orthogonalizable:
            self.edit = WeightEdit(self.active.label, lambda: self.active.apply(lm))
        self._held: ExitStack | None = None  # the weight edit, while it is applied
        self._lock = threading.Lock()

    @property
    def edited_label(self) -> str:
        if self.edit is not None:
            return self.edit.label
        return f"ablation hooks ({self.lm.arch.model_type} weights cannot be edited exactly)"

    def numbers(self) -> EditNumbers | None:
        """The edited model's own measured numbers, from its run folder (None without one)."""
        if self.run is None:
            return None
        from refusalkit.report.active_edit import edit_numbers

        return edit_numbers(self.run, self.active)

    def close(self) -> None:
        """Restore the original weights if an edit is applied."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            held.close()

    def _hooks(self, setting: Setting) -> AbstractContextManager[Any]:
        """Put the weights in the state ``setting`` needs, and return its per-answer hooks."""
        edit = self.edit if setting.kind == "edited" else None
        if edit is None:
            self._release()
        elif self._held is None:
            stack = ExitStack()
            stack.enter_context(edit.apply())
            self._held = stack
        arch, d = self.lm.arch, self.direction
        if setting.kind == "ablation" or (setting.kind == "edited" and self.edit is None):
            return ablate_direction(arch, d.vector)
        if setting.kind == "add":
            return add_direction(arch, d.vector, d.layer, setting.coeff)
        return nullcontext()

    def prompt(self, messages: list[Message]) -> str:
        """The conversation rendered by the chat template, ready for the assistant's next turn."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return str(
            self.lm.tokenizer.apply_chat_template(
                [*system, *messages], tokenize=False, add_generation_prompt=True
            )
        )

    def stream(
        self, messages: list[Message], setting: Setting, max_new_tokens: int
    ) -> Generator[str, None, None]:
        """The greedy reply to ``messages`` under ``setting``, as text pieces in order.

        Holds the model for the whole answer (one answer at a time); closing the iterator early ends the
        answer and removes its hooks.
        """
        with self._lock, self._hooks(setting):
            yield from decode_stream(
                self.lm.tokenizer, greedy_ids(self.lm, self.prompt(messages), max_new_tokens)
            )

    def reply(self, messages: list[Message], setting: Setting, max_new_tokens: int) -> str:
        return "".join(self.stream(messages, setting, max_new_tokens))


@torch.inference_mode()
def greedy_ids(lm: LoadedModel, prompt: str, max_new_tokens: int) -> Iterator[int]:
    """Greedy next-token ids after ``prompt`` (already formatted), one forward pass each, with a KV cache.

    Stops before an EOS token. One prompt, no padding: positions follow from the cache length.
    """
    batch = encode(lm.tokenizer, [prompt]).to(lm.device)
    stop = eos_ids(lm)  # the stop tokens of every generation in the project
    key = cache_kwarg(lm.model)
    out = lm.model(input_ids=batch.input_ids, use_cache=True, logits_to_keep=1)
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt in stop:
            return
        yield nxt
        step = torch.tensor([[nxt]], device=lm.device)
        out = lm.model(input_ids=step, use_cache=True, logits_to_keep=1, **{key: cache_of(out)})


def decode_stream(tokenizer: Any, ids: Iterator[int]) -> Iterator[str]:
    """Text pieces of a growing token sequence. A trailing replacement character (a multi-byte character
    split across tokens) is held back until the next token completes it."""
    seen: list[int] = []
    sent = ""
    for i in ids:
        seen.append(i)
        text = tokenizer.decode(seen, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(sent) and len(text) > len(sent):
            yield text[len(sent) :]
            sent = text
    text = tokenizer.decode(seen, skip_special_tokens=True) if seen else ""
    if text.startswith(sent) and len(text) > len(sent):
        yield text[len(sent) :]


def load_chat_model(run_dir: str | Path, edit: str | None = None) -> ChatModel:
    """Load the model of a run folder (its settings) with the run's direction and the edit ``edit``
    names (an ``--edit`` value; default: the run's active edit)."""
    from refusalkit.models.loading import load_model

    run = RunFolder(run_dir)
    settings = run.settings()
    direction = run.direction()
    active = run.active_edit(edit)
    lm = load_model(settings.model, **settings.model_kwargs())
    return ChatModel(lm, direction, system_prompt=settings.system_prompt, active=active, run=run)
