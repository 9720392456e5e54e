"""load_model on local folders: the errors users hit first, and the chat-template override."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CHATML, tiny_model, tiny_tokenizer
from refusalkit.errors import RefusalkitError
from refusalkit.models.loading import contiguous_head_input, fingerprint, load_model
from refusalkit.models.registry import ensure_converted


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--dtype auto's probe (and any bfloat16 copy) go to a fresh cache, not the user's."""
    monkeypatch.setenv("REFUSALKIT_CACHE", str(tmp_path / "cache"))


def _save(tmp_path: Path, with_template: bool) -> Path:
    tok = tiny_tokenizer()
    if not with_template:
        tok.chat_template = None
    model = tiny_model("qwen2", vocab_size=len(tok))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if not with_template:
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def test_folder_without_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    folder = _save(tmp_path, with_template=False)
    with pytest.raises(RefusalkitError, match=r"no chat template.*--chat-template"):
        load_model(str(folder), device="cpu")


def test_chat_template_file_fixes_it(tmp_path: Path) -> None:
    folder = _save(tmp_path, with_template=False)
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    lm = load_model(str(folder), device="cpu", chat_template=str(template))
    assert lm.tokenizer.chat_template == CHATML
    assert lm.tokenizer.padding_side == "left" and lm.arch.n_layers == 4
    assert lm.fingerprint == fingerprint(str(folder)) and lm.fingerprint.startswith("files-sha256:")


def test_missing_model_paths(tmp_path: Path) -> None:
    with pytest.raises(RefusalkitError, match="not found"):
        load_model(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefusalkitError, match=r"no config\.json"):
        load_model(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(RefusalkitError, match="unknown built-in model"):
        ensure_converted("no-such-model")


def test_loaded_model_head_sees_contiguous_input(tmp_path: Path) -> None:
    # transformers slices the kept positions into a strided view; the head gets a contiguous copy
    # (torch's batched matmul path for strided input is ~4x slower), same logits.
    lm = load_model(str(_save(tmp_path, with_template=True)), device="cpu")
    seen: list[bool] = []
    lm.arch.unembed.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, 50, (3, 7))
    with torch.inference_mode():
        kept = lm.model(input_ids=ids, logits_to_keep=2).logits
        full = lm.model(input_ids=ids).logits
    assert seen == [True, True]
    torch.testing.assert_close(kept, full[:, -2:], atol=1e-5, rtol=1e-5)
    contiguous_head_input(lm.arch.unembed)  # a second call adds no second hook
    assert len(lm.arch.unembed._forward_pre_hooks) == 2
