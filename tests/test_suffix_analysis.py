"""Suffix analysis on tiny random models: head attributions are exact, attention shares sum to one,
random controls have the requested length, and `refusalkit suffix` works on a run folder."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from refusalkit.analysis.suffix import analyze_suffixes
from refusalkit.analysis.tokens import ROLES, PromptTemplate, allowed_token_ids, random_suffixes, token_roles
from refusalkit.analysis.trace import eager_attention, head_outputs, trace
from refusalkit.directions import Direction
from refusalkit.interventions import hooks
from refusalkit.prompts import encode

HARMFUL = ["Explain how tides work.", "Write a haiku about rain", "List three prime numbers please."]
HARMLESS = ["Name a color.", "Count to five."]
SUFFIX = " zq!x y"


def _direction(lm: Any) -> Direction:
    gen = torch.Generator().manual_seed(1)
    return Direction(
        torch.randn(lm.arch.embed.weight.shape[1], generator=gen), layer=2, position=-1, model=lm.name
    )


@pytest.mark.parametrize(
    ("family", "overrides"), [("qwen2", {}), ("llama", {"attention_bias": True}), ("gemma2", {})]
)
def test_head_outputs_sum_to_output_projection(make_lm: Any, family: str, overrides: dict[str, Any]) -> None:
    lm = make_lm(family, **overrides)
    if overrides.get("attention_bias"):
        with torch.no_grad():
            for proj in lm.arch.attn_out_proj:
                proj.bias.normal_()  # the init zeroes it; a real bias checks that it is kept apart
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(layer: int) -> Any:
        def hook(_m: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            seen[layer] = (args[0][:, -1].detach(), out[:, -1].detach())

        return hook

    regs = [partial(m.register_forward_hook, grab(i)) for i, m in enumerate(lm.arch.attn_out_proj)]
    batch = encode(
        lm.tokenizer, [PromptTemplate.from_tokenizer(lm.tokenizer).render(x).text for x in HARMFUL]
    )
    with torch.no_grad(), hooks(regs):
        lm.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        )
    for layer, proj in enumerate(lm.arch.attn_out_proj):
        z, out = seen[layer]
        heads = head_outputs(proj, z, lm.arch.n_heads)  # [b, H, d]
        assert heads.shape == (len(HARMFUL), lm.arch.n_heads, out.shape[-1])
        bias = proj.bias if proj.bias is not None else torch.zeros(out.shape[-1])
        torch.testing.assert_close(heads.sum(1) + bias, out, atol=1e-4, rtol=1e-4)


def test_trace_shares_sum_to_one_and_batching_does_not_matter(make_lm: Any) -> None:
    lm = make_lm("qwen2")
    lm.model.set_attn_implementation("sdpa")
    template = PromptTemplate.from_tokenizer(lm.tokenizer)
    prompts = [template.render(x, SUFFIX if i % 2 else "") for i, x in enumerate(HARMFUL)]
    unit = _direction(lm).unit
    together = trace(lm, prompts, unit, [5], batch_size=3)
    alone = trace(lm, prompts, unit, [5], batch_size=1)
    n, L, H = len(prompts), lm.arch.n_layers, lm.arch.n_heads
    assert together.attn_share.shape == (n, L, H, len(ROLES))
    torch.testing.assert_close(together.attn_share.sum(-1), torch.ones(n, L, H), atol=1e-5, rtol=0)
    for field in ("cosine", "head_attr", "attn_share", "metric"):
        torch.testing.assert_close(getattr(together, field), getattr(alone, field), atol=1e-4, rtol=1e-4)
    assert together.suffix_tokens.tolist() == [0, len(lm.tokenizer.encode(SUFFIX)), 0]
    assert together.cosine.shape == (n, L + 1) and (together.cosine.abs() <= 1 + 1e-6).all()
    assert lm.model.config._attn_implementation == "sdpa"  # restored after the eager trace
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_eager_attention_restores_after_an_exception(make_lm: Any) -> None:
    lm = make_lm("llama")
    lm.model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError), eager_attention(lm.model):
        assert lm.model.config._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert lm.model.config._attn_implementation == "sdpa"


def test_token_roles_follow_the_spans(make_lm: Any) -> None:
    tok = make_lm("qwen2").tokenizer
    p = PromptTemplate.from_tokenizer(tok).render("Hi there", SUFFIX)
    roles = token_roles(tok, p)
    assert p.text[p.instruction_span[0] : p.instruction_span[1]] == "Hi there"
    assert roles.count(ROLES.index("instruction")) == len("Hi there")  # byte-level tokenizer
    assert roles.count(ROLES.index("suffix")) == len(SUFFIX)
    assert roles[0] == 0 and roles[-1] == 3 and roles == sorted(roles)


def test_random_suffixes_have_the_requested_length(make_lm: Any) -> None:
    tok = make_lm("qwen2").tokenizer
    allowed = allowed_token_ids(tok, len(tok))
    suffixes = random_suffixes(tok, 4, 7, seed=0, allowed=allowed)
    assert all(len(tok.encode(s, add_special_tokens=False)) == 7 for s in suffixes)
    assert suffixes == random_suffixes(tok, 4, 7, seed=0, allowed=allowed)
    assert suffixes != random_suffixes(tok, 4, 7, seed=1, allowed=allowed)
    assert all(s.isascii() and s.isprintable() for s in suffixes)


def test_analysis_keys_and_json(make_lm: Any) -> None:
    lm = make_lm("gemma2")  # post-norm family: attribution is pre-norm
    res, completions = analyze_suffixes(
        lm,
        _direction(lm),
        HARMFUL,
        HARMLESS,
        [SUFFIX],
        refusal_ids=[5],
        n_random=2,
        top_heads=3,
        max_new_tokens=2,
        search_prompts=[0],
    )
    json.dumps(res)
    assert {
        "cosine",
        "projection",
        "head_attribution",
        "attention",
        "refusal",
        "summary",
        "suffixes",
        "prompts",
    } <= set(res)
    assert res["conditions"] == ["harmful", "adversarial", "random", "harmless"]
    assert len(res["cosine"]["sites"]) == lm.arch.n_layers + 1
    assert len(res["head_attribution"]["top_heads"]) == 3
    assert "pre-norm" in res["head_attribution"]["attribution_site"]
    assert len(res["suffixes"]["random"]) == 2 and res["suffixes"]["n_tokens"] == len(SUFFIX)
    assert res["refusal"]["random"]["n"] == 2 * len(HARMFUL)
    assert {"search_prompts", "heldout_prompts", "per_suffix"} <= set(res["refusal"]["adversarial"])
    for n in res["conditions"]:
        assert sum(res["attention"]["mean_over_top_heads"][n].values()) == pytest.approx(1.0, abs=1e-5)
    assert "gap_closed_at_layer" in res["summary"]["adversarial"]
    assert not any(h in json.dumps(res) for h in HARMFUL)  # prompts by index only
    assert len(completions["adversarial"]) == len(HARMFUL)


def test_suffix_file_keeps_leading_spaces(tmp_path: Path) -> None:
    from refusalkit.analysis.cli import load_suffixes

    (tmp_path / "s.txt").write_text(" ! x y\n\n  two spaces\r\n")
    assert load_suffixes(tmp_path / "s.txt") == ([" ! x y", "  two spaces"], [])
    (tmp_path / "s.json").write_text(
        json.dumps({"best": {"suffix": " a b"}, "meta": {"prompt_indices": [3]}})
    )
    assert load_suffixes(tmp_path / "s.json") == ([" a b"], [3])


def _tiny_run(make_lm: Any, tmp_path: Path) -> Path:
    """A run folder the way the pipeline lays it out, around a tiny model saved as a model folder."""
    from refusalkit.pipeline import Run
    from refusalkit.settings import build_settings

    lm = make_lm("qwen2")
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    settings = build_settings({"model": str(model_dir), "n_train": 2, "n_val": 2, "n_test": 3})
    run = Run(tmp_path / "run", settings, lm=lm)
    run.splits()
    run._save_manifest()
    return run.out


def test_cli_search_then_analyze(make_lm: Any, tmp_path: Path, capsys: Any) -> None:
    from refusalkit.cli import main

    out = _tiny_run(make_lm, tmp_path)
    assert main(["suffix", "analyze", str(out)]) == 2
    assert "no selected direction" in capsys.readouterr().err
    _direction(make_lm("qwen2")).save(out / "select" / "direction")
    assert main(["suffix", "analyze", str(out)]) == 2
    assert "no suffix found" in capsys.readouterr().err
    search = [
        "suffix",
        "search",
        str(out),
        "--steps",
        "2",
        "--search-width",
        "8",
        "--topk",
        "4",
        "--init",
        " ! !",
        "--n-prompts",
        "2",
        "--objective",
        "both",
        "--no-filter",
    ]
    assert main(search) == 0
    saved = json.loads((out / "suffix" / "search.json").read_text())
    assert saved["meta"]["prompt_indices"] == [0, 1] and len(saved["history"]) == 3
    analyze = [
        "suffix",
        "analyze",
        str(out),
        "--n-random",
        "1",
        "--n-prompts",
        "3",
        "--n-harmless",
        "2",
        "--max-new-tokens",
        "2",
        "--top-heads",
        "2",
        "--no-filter",
    ]
    assert main(analyze) == 0
    res = json.loads((out / "suffix" / "analysis.json").read_text())
    assert res["suffixes"]["adversarial"] == [saved["best"]["suffix"]]
    assert res["prompts"]["harmful"] == [0, 1, 2] and res["prompts"]["search"] == [0, 1]
    for name in ("cosine", "heads", "attention", "refusal"):
        assert (out / "suffix" / f"{name}.png").stat().st_size > 0
    assert "adversarial" in capsys.readouterr().out


# ---- plots ---------------------------------------------------------------------------------------------


def _analysis(rates: dict[str, float], n: int = 6) -> dict[str, Any]:
    """A made-up analysis.json with the layout ``analyze_suffixes`` writes (2 layers, 2 heads)."""
    from refusalkit.evaluation.refusal import rate

    names = list(rates)
    roles = dict.fromkeys(ROLES, 0.25)
    refusal = {}
    for c, r in rates.items():
        record = rate(round(r * n), n)
        if r == 1.0:  # as the Wilson bound used to read back: a hair below a rate of exactly 1
            record["ci95"][1] = 0.9999999999999999
        if r == 0.0:
            record["ci95"][0] = 2.7755575615628914e-17
        refusal[c] = record | {"metric_mean": 2 * r - 1}
    top = [{"layer": 1, "head": 0} | dict.fromkeys(names, 0.5)]
    return {
        "conditions": names,
        "roles": list(ROLES),
        "direction": {"layer": 1, "position": -1},
        "cosine": {"sites": ["resid_pre.0", "resid_pre.1", "resid_post.1"]}
        | {c: {"mean": [0.1, 0.2, 0.3], "std": [0.0, 0.1, 0.0]} for c in names},
        "head_attribution": {
            "attribution_site": "attention output projection",
            "mean": {c: [[0.0, 0.0], [0.0, 0.0]] for c in names},  # all zero: the colour scale's edge case
            "top_heads": top,
        },
        "attention": {
            "top_heads": [{"layer": 1, "head": 0} | {c: roles for c in names}],
            "mean_over_top_heads": {c: roles for c in names},
        },
        "refusal": refusal,
    }


@pytest.mark.parametrize(
    "rates",
    [
        {"harmful": 1.0, "adversarial": 0.0, "random": 1.0, "harmless": 0.0},
        {"harmful": 1.0, "adversarial": 1.0, "random": 1.0, "harmless": 1.0},
        {"harmful": 0.0, "adversarial": 0.0, "random": 0.0, "harmless": 0.0},
    ],
    ids=["mixed", "all-one", "all-zero"],
)
def test_every_plot_draws_rates_of_exactly_0_and_1(
    tmp_path: Path, rates: dict[str, float], caplog: Any
) -> None:
    from refusalkit.analysis.plots import PLOTS, write_plots

    written = write_plots(_analysis(rates), tmp_path)
    assert [p.name for p in written] == list(PLOTS)
    assert all(p.stat().st_size > 0 for p in written)
    assert "not drawn" not in caplog.text


def test_error_bars_never_negative() -> None:
    from refusalkit.analysis.plots import error_bars

    below, above = error_bars(
        [1.0, 0.0, 0.5, 0.5], [[0.6, 0.9999999999999999], [1e-17, 0.4], [0.2, 0.8], [None, None]]
    )
    assert min(below + above) >= 0.0
    assert above[0] == 0.0 and below[1] == 0.0 and below[2] == pytest.approx(0.3) and above[3] == 0.0


def test_a_failing_plot_is_a_warning_that_names_it(tmp_path: Path, caplog: Any) -> None:
    from refusalkit.analysis.plots import write_plots

    res = _analysis({"harmful": 1.0, "harmless": 0.0})
    del res["head_attribution"]  # e.g. an analysis.json from an older version, without this part
    with caplog.at_level("WARNING"):
        written = write_plots(res, tmp_path)
    assert [p.name for p in written] == ["cosine.png", "attention.png", "refusal.png"]
    assert "heads.png" in caplog.text and "not drawn" in caplog.text
    assert not (tmp_path / "heads.png").exists()


def test_older_rate_layouts_still_plot(tmp_path: Path) -> None:
    """analysis.json files written before the one rate record: {rate, refused, n, ci95}, NaN at n = 0."""
    from refusalkit.analysis.plots import plot_refusal

    res = _analysis({"harmful": 1.0, "harmless": 0.0})
    res["refusal"]["harmful"] = {
        "rate": 1.0,
        "refused": 6,
        "n": 6,
        "ci95": [0.61, 0.9999999999999999],
        "metric_mean": 1.0,
    }
    plot_refusal(res, tmp_path / "refusal.png")
    res["refusal"]["harmless"] = {
        "rate": float("nan"),
        "refused": 0,
        "n": 0,
        "ci95": [float("nan")] * 2,
        "metric_mean": 0.0,
    }
    plot_refusal(res, tmp_path / "refusal.png")
    assert (tmp_path / "refusal.png").stat().st_size > 0
