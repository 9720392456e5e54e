"""The chat engine (settings, streaming, the held weight edit) and the terminal chat, driven as a person
would in a pseudo-terminal. Everything runs on a tiny random model saved as a run folder."""

from __future__ import annotations

import html
import io
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from refusalkit.chat.engine import ChatModel, Setting, decode_stream, load_chat_model
from refusalkit.chat.terminal import Terminal, main, printable
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.generation import generate
from refusalkit.interventions import ablate_direction
from refusalkit.layout import RunLayout
from refusalkit.utils import write_json

PROMPT = "Tell me about tea."
MAX_NEW = 10


def readable(model: Any, tok: Any) -> Any:
    """Zero the head's rows of every token but printable ASCII: the largest of ~95 random logits is
    positive, so greedy answers are readable text that never ends before the token limit."""
    keep = torch.zeros(len(tok), dtype=torch.bool)
    for i in range(len(tok)):
        s = tok.decode([i])
        keep[i] = len(s) == 1 and s.isascii() and s.isprintable()
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0
    return model


def make_chat_run(root: Path) -> Path:
    """A run folder the chat can open: a saved tiny model with a readable head, its manifest settings,
    a direction, results and a report."""
    tok = tiny_tokenizer()
    model = readable(tiny_model("qwen2", vocab_size=len(tok)), tok)
    folder = root / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    run = root / "run"
    layout = RunLayout(run)
    write_json(layout.manifest, {"settings": {"model": str(folder), "dtype": "float32", "device": "cpu"}})
    vector = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 4
    Direction(vector, layer=2, position=-1, model="tiny").save(layout.direction)
    write_json(
        layout.results,
        {
            "model": {"name": "tiny-model"},
            "direction": {"layer": 2, "position": -1},
            "refusal_rates": {
                "harmful": {"baseline": 0.75, "ablation": 0.25, "orthogonalized": 0.25},
                "harmless": {"baseline": 0.0, "actadd": 0.5},
            },
        },
    )
    rate = lambda k: {"refusal_rate": k / 4, "refused": k, "n": 4, "ci95": [0.1, 0.9]}  # noqa: E731
    write_json(
        layout.refusal_rates,
        {
            "max_new_tokens": 8,
            "harmful": {"baseline": rate(3), "ablation": rate(1), "orthogonalized": rate(1)},
            "harmless": {"baseline": rate(0), "actadd": rate(2)},
        },
    )
    layout.report_html.write_text("<!doctype html><title>tiny report</title><h1>the tiny report</h1>")
    return run


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_run(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def chat(chat_run: Path) -> ChatModel:
    model = load_chat_model(chat_run)
    yield model
    model.close()


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_setting_parse() -> None:
    assert Setting.parse("add 1") == Setting("add", 1.0)
    assert Setting.parse("add:-0.5").label == "add -0.5"
    assert Setting.parse(" edited ").kind == "edited"
    with pytest.raises(RefusalkitError, match="number"):
        Setting.parse("add much")
    with pytest.raises(RefusalkitError, match="unknown setting"):
        Setting.parse("abliterated")


def test_stream_matches_batched_generation(chat: ChatModel) -> None:
    """The KV-cache loop is the same greedy decoding as `generate`, with and without hooks."""
    prompt = chat.prompt(ask(PROMPT))
    pieces = list(chat.stream(ask(PROMPT), Setting("original"), MAX_NEW))
    assert len(pieces) > 1, "the answer must arrive in pieces"
    assert "".join(pieces) == generate(chat.lm, [prompt], max_new_tokens=MAX_NEW)[0]
    assert len("".join(pieces)) == MAX_NEW  # one printable byte per token, no early stop
    with ablate_direction(chat.lm.arch, chat.direction.vector):
        ablated = generate(chat.lm, [prompt], max_new_tokens=MAX_NEW)[0]
    assert chat.reply(ask(PROMPT), Setting("ablation"), MAX_NEW) == ablated
    assert ablated != "".join(pieces), "the direction must change this answer, or the test shows nothing"


def test_stream_stops_on_the_tokens_generate_stops_on(chat: ChatModel) -> None:
    """The chat stops where `generate` does (``generation.eos_ids``): an EOS listed only in the
    generation config ends the answer there too."""
    from refusalkit.generation import generate_ids

    prompt = chat.prompt(ask(PROMPT))
    ids = generate_ids(chat.lm, [prompt], max_new_tokens=MAX_NEW)[0]
    stop = next(t for t in ids if t != ids[0])  # a token that first comes after the answer began
    k = ids.index(stop)
    config = chat.lm.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = [stop, *([saved] if isinstance(saved, int) else saved or [])]
    try:
        stopped = generate_ids(chat.lm, [prompt], max_new_tokens=MAX_NEW)[0]
        got = chat.reply(ask(PROMPT), Setting("original"), MAX_NEW)
    finally:
        config.eos_token_id = saved
    assert stopped == ids[: k + 1]  # generate keeps the EOS id; the chat shows no text of it
    assert 0 < len(got) < MAX_NEW and got == chat.lm.tokenizer.decode(ids[:k], skip_special_tokens=True)


def test_edit_is_held_between_answers_and_restored(chat: ChatModel) -> None:
    weights = {k: v.clone() for k, v in chat.lm.model.state_dict().items()}
    original = chat.reply(ask(PROMPT), Setting("original"), MAX_NEW)
    edited = chat.reply(ask(PROMPT), Setting("edited"), MAX_NEW)
    embed = chat.lm.arch.embed.weight
    assert not torch.equal(embed, weights["model.embed_tokens.weight"]), "the edit is kept between answers"
    assert abs(float(embed[5].double() @ chat.direction.unit.double())) < 1e-4
    assert chat.reply(ask(PROMPT), Setting("edited"), MAX_NEW) == edited
    # Orthogonalized weights answer like the ablation hooks (PAPER.md section 5).
    assert chat.reply(ask(PROMPT), Setting("ablation"), MAX_NEW) == edited
    assert chat.reply(ask(PROMPT), Setting("original"), MAX_NEW) == original
    chat.reply(ask(PROMPT), Setting("edited"), MAX_NEW)
    chat.close()
    for k, v in chat.lm.model.state_dict().items():
        assert torch.equal(v, weights[k]), f"{k} not restored bit for bit"
    assert not chat.lm.arch.blocks[0]._forward_pre_hooks, "no hook may outlive its answer"


def test_closing_a_stream_early_removes_its_hooks(chat: ChatModel) -> None:
    stream = chat.stream(ask(PROMPT), Setting("add", 1.0), MAX_NEW)
    next(stream)
    assert chat.lm.arch.blocks[chat.direction.layer]._forward_pre_hooks
    stream.close()
    assert not chat.lm.arch.blocks[chat.direction.layer]._forward_pre_hooks
    assert chat.reply(ask(PROMPT), Setting("original"), 3)  # and the lock was released


def test_edited_means_the_ablation_hooks_where_weights_cannot_be_edited(make_lm: Any) -> None:
    lm = make_lm("gemma2")
    readable(lm.model, lm.tokenizer)
    direction = Direction(
        torch.randn(64, generator=torch.Generator().manual_seed(3)) * 4, layer=1, position=-1
    )
    chat = ChatModel(lm, direction)
    assert chat.edited_label.startswith("ablation hooks (gemma2")
    with ablate_direction(lm.arch, direction.vector):
        ablated = generate(lm, [chat.prompt(ask(PROMPT))], max_new_tokens=4)[0]
    assert chat.reply(ask(PROMPT), Setting("edited"), 4) == ablated
    assert chat.reply(ask(PROMPT), Setting("original"), 4) != ablated
    with pytest.raises(RefusalkitError, match="d_model"):
        ChatModel(lm, Direction(torch.ones(8), layer=1, position=-1))


def test_decode_stream_never_splits_a_character() -> None:
    tok = tiny_tokenizer()
    ids = tok("tea é ☕ ok", add_special_tokens=False)["input_ids"]
    pieces = list(decode_stream(tok, iter(ids)))
    assert "".join(pieces) == "tea é ☕ ok"
    assert all("\ufffd" not in p for p in pieces)


def test_printable_hides_terminal_controls() -> None:
    assert printable("a\x1b[2Jb\r\tc\n\x07") == "a\ufffd[2Jb\ufffd\tc\n\ufffd"


def test_edited_is_the_searchs_chosen_edit_when_there_is_one(chat_run: Path, tmp_path: Path) -> None:
    from refusalkit.directions import Candidates
    from refusalkit.search.edit import EditParams, Kernel, applied_edit

    run = tmp_path / "searched"
    shutil.copytree(chat_run, run)
    layout = RunLayout(run)
    gen = torch.Generator().manual_seed(5)
    Candidates(torch.randn(2, 4, 64, generator=gen) * 4, torch.randn(2, 4, 64, generator=gen)).save(
        layout.candidates
    )
    params = EditParams(
        position=-2, layer=1, attn=Kernel(peak=1.0, position=1, minimum=0.5, width=2), embed=1.0
    )
    write_json(layout.chosen, {"trial": 7, "edit": params.model_dump()})
    chat = load_chat_model(run)
    try:
        assert chat.edited_label == "the search's chosen edit (trial 7)"
        edited = chat.reply(ask(PROMPT), Setting("edited"), MAX_NEW)
        assert edited != chat.reply(ask(PROMPT), Setting("ablation"), MAX_NEW)
        with applied_edit(chat.lm, Candidates.load(layout.candidates), params):
            assert edited == generate(chat.lm, [chat.prompt(ask(PROMPT))], max_new_tokens=MAX_NEW)[0]
    finally:
        chat.close()
    write_json(layout.chosen, {"trial": 7})
    with pytest.raises(RefusalkitError, match="no readable edit"):
        load_chat_model(run)
    assert load_chat_model(run, "direction").edited_label.startswith("orthogonalized weights")


class Recorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_terminal_commands_and_conversations(chat: ChatModel) -> None:
    out = Recorder()
    term = Terminal(chat, out, MAX_NEW)
    read = scripted(
        PROMPT, "/both", PROMPT, "/add 1", "/add x", "/nope", "/help", "/reset", "/quit", "unread"
    )
    assert term.loop(read) == 0
    text = out.getvalue()
    edited = chat.reply(ask(PROMPT), Setting("edited"), MAX_NEW)
    original = chat.reply(ask(PROMPT), Setting("original"), MAX_NEW)
    assert f"edited> {edited}\n" in text
    assert f"original> {original}\n" in text
    assert "setting: side by side: original | edited" in text
    assert "setting: side by side: original | add +1" in text
    assert "`add` needs a number" in text and "unknown command /nope" in text and "/ablation" in text
    assert text.rstrip().endswith("conversations cleared")
    assert term.histories == {}
    # Streamed: the edited answer was flushed to the screen in several steps, growing each time.
    steps = [s for s in out.flushed if "edited> " in s and s.count("edited> ") == 1 and "original> " not in s]
    assert len({len(s) for s in steps}) > 3


def scripted(*lines: str):  # type: ignore[no-untyped-def]
    """A ``read`` for ``Terminal.loop`` that types ``lines``, then ends the input like Ctrl-D."""
    queue = list(lines)

    def read(_prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read


def test_each_setting_keeps_its_own_conversation(chat: ChatModel) -> None:
    term = Terminal(chat, io.StringIO(), MAX_NEW)
    assert term.loop(scripted(PROMPT, "And coffee?", "/original", "And coffee?")) == 0
    edited, original = term.histories["edited"], term.histories["original"]
    assert [m["role"] for m in edited] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in original[:1]] == ["And coffee?"] and len(original) == 2
    first = chat.reply(ask(PROMPT), Setting("edited"), MAX_NEW)
    assert edited[1]["content"] == first
    assert edited[3]["content"] == chat.reply(edited[:3], Setting("edited"), MAX_NEW)


class Interrupted:
    """A model whose answer is cut by Ctrl-C after its first piece."""

    edited_label = "stub"

    def stream(self, messages: list[dict[str, str]], setting: Setting, max_new_tokens: int):  # type: ignore[no-untyped-def]
        yield "Sure"
        raise KeyboardInterrupt


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on() -> None:
    out = io.StringIO()
    term = Terminal(Interrupted(), out, MAX_NEW)  # type: ignore[arg-type]
    assert term.loop(scripted(PROMPT, "/both", PROMPT)) == 0
    text = out.getvalue()
    assert text.count("edited> Sure\n[stopped; this turn is not kept]") == 1
    assert "original> Sure\n[stopped" in text and "edited> Sure" in text.split("original> ")[0]
    assert text.count("[stopped") == 2, "side by side stops at the first interrupted answer"
    assert term.histories == {"edited": [], "original": []}


def test_every_command_resolves_the_same_edit(chat_run: Path, tmp_path: Path) -> None:
    """On a searched run, chat, the page, the export (its card and its weights) and the report all call
    the search's choice "edited" and show its numbers; `--edit direction` on each gives the paper's."""
    from refusalkit.export.cli import ExportOptions, run_export
    from refusalkit.report import build_report
    from refusalkit.serve.server import PageServer
    from test_model_card import CHOSEN, add_search

    run = tmp_path / "searched"
    shutil.copytree(chat_run, run)
    add_search(RunLayout(run))
    label = f"the search's chosen edit (trial {CHOSEN})"
    for edit, name, number, other in (
        (None, label, "0.03 = 3/100", "0.25 = 1/4"),
        ("direction", "orthogonalized weights", "0.25 = 1/4", "3/100"),
    ):
        chat = load_chat_model(run, edit)
        try:
            assert chat.edited_label.startswith(name)
            numbers = chat.numbers()
            assert numbers is not None and number in numbers.summary() and other not in numbers.summary()
            server = PageServer(("127.0.0.1", 0), chat, run, MAX_NEW)
            try:
                page = server.page().decode()
            finally:
                server.server_close()
            assert html.escape(name) in page and number in page and other not in page
            out = tmp_path / f"export-{edit}"
            run_export(run, ExportOptions(format="safetensors", out_dir=out, edit=edit), lm=chat.lm)
            card = (out / "README.md").read_text()
            assert name in card and number in card and other not in card
            assert (out / "refusalkit_edit.json").exists() == (edit is None)
            with chat.active.apply(chat.lm):  # the weights exported are the edit chat answers with
                want = chat.lm.model.model.layers[1].self_attn.o_proj.weight.clone()
            from safetensors.torch import load_file

            got = load_file(str(out / "model.safetensors"))["model.layers.1.self_attn.o_proj.weight"]
            assert torch.equal(got, want)
        finally:
            chat.close()
        built = build_report(run, edit=edit)
        report = built.json.read_text()
        assert name in report and number in report and other not in report.split('"headline"')[0]
        assert html.escape(name) in built.html.read_text()


def test_run_folder_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RefusalkitError, match="not a run folder"):
        load_chat_model(tmp_path)
    write_json(RunLayout(tmp_path).manifest, {"settings": {}})
    with pytest.raises(RefusalkitError, match="refusalkit select"):
        load_chat_model(tmp_path)
    assert main([str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main([str(tmp_path), "--max-new-tokens", "0", "--setting", "add x", "--edit", "trial 3"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens" in err and "--setting" in err  # every invalid option at once
    assert "--edit: Value error, --edit 'trial 3': use direction, search or trial:N" in err


class Screen:
    """A program on a pseudo-terminal: what a person sees, and what they type."""

    def __init__(self, argv: list[str]) -> None:
        self.fd, child = pty.openpty()
        env = {**os.environ, "COLUMNS": "200", "TERM": "xterm"}
        self.proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
        os.close(child)
        self.seen = ""

    def wait_for(self, pattern: str, timeout: float = 60.0) -> str:
        """Read the screen until ``pattern`` (a regex) shows up; fail with the screen if it never does."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never saw {pattern!r}; the screen:\n{self.seen}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the program closed the terminal
                    raise AssertionError(f"exited before {pattern!r}; the screen:\n{self.seen}") from None
        return self.seen

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.fd)


def _clean(screen: str) -> str:
    """The screen's text without terminal escape sequences and carriage returns."""
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", screen).replace("\r", "")


def test_chat_in_a_terminal(chat_run: Path, chat: ChatModel) -> None:
    original = chat.reply(ask(PROMPT), Setting("original"), MAX_NEW)
    edited = chat.reply(ask(PROMPT), Setting("edited"), MAX_NEW)
    history = [*ask(PROMPT), {"role": "assistant", "content": edited}, *ask("Why?")]
    follow_up = chat.reply(history, Setting("edited"), MAX_NEW)
    third = chat.reply(
        [*history, {"role": "assistant", "content": follow_up}, *ask(PROMPT)], Setting("edited"), MAX_NEW
    )
    argv = [sys.executable, "-m", "refusalkit.chat", str(chat_run), "--max-new-tokens", str(MAX_NEW)]
    screen = Screen(argv)
    try:
        # the banner: which edit "edited" is, and its own numbers (the run's orthogonalized rates)
        screen.wait_for(
            r"edited, measured: harmful prompts refused \(the paper's refusal phrases\): 0\.75 = 3/4 .* -> "
            r"0\.25 = 1/4"
        )
        screen.wait_for(r"setting: edited\. /help")
        screen.wait_for(r"you> ")
        screen.type(PROMPT)
        screen.wait_for(re.escape(f"edited> {edited}") + r"\s+you> ")
        screen.type("Why?")  # the second turn sees the first (the chat template renders the history)
        screen.wait_for(re.escape(f"edited> {follow_up}") + r"\s+you> ")
        screen.type("/both")
        screen.wait_for(r"side by side: original \| edited")
        screen.type(PROMPT)
        seen = screen.wait_for(
            re.escape(f"original> {original}") + r"\s+" + re.escape(f"edited> {third}") + r"\s+you> "
        )
        screen.type("/quit")
        assert screen.proc.wait(timeout=60) == 0
    finally:
        screen.close()
    text = _clean(seen)
    assert f"you> {PROMPT}\n" in text, "the typed prompt is echoed as a person sees it"
    assert text.count("original> ") == 1 and text.count("edited> ") == 3
