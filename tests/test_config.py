"""One definition per setting: the command line, ``--help``, YAML files and the typed configs all come
from the components' config fields (megatron_gopd.flags), and the domain routing is one object.
Expected values are written out by hand here, never read back from the code under test."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from megatron_gopd.flags import FlagFormatter, add_flags, config_from_args, flag
from megatron_gopd.trainer.config import build_config, build_parser, parse_args
from megatron_gopd.trainer.routing import DomainRoute, Routing
from megatron_gopd.utils import GopdError

BASE = ["--student-load", "S", "--teacher-load", "T", "--prompt-data", "p.jsonl"]


def _options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def test_every_flag_has_help_and_shows_its_default():
    parser = build_parser()
    fmt = FlagFormatter("gopd-train")
    for action in _options(parser):
        assert action.help and action.help.strip(), f"{action.option_strings[0]} has no help"
        line = fmt._get_help_string(action) % {"default": action.default}
        assert "default: " in line, f"{action.option_strings[0]}: {line!r}"
        assert "(default: None)" not in line, f"{action.option_strings[0]}: {line!r}"
    text = parser.format_help()
    text = text[text.index("\noptions:") :]  # the flag descriptions, past the usage lines
    # the flags the issue found without help or default, and the one that read "default: None"
    for name, default in [
        ("--lr", "1e-05"),
        ("--min-lr", "0.0"),
        ("--adam-beta2", "0.98"),
        ("--max-response-len", "1024"),
        ("--rollout-temperature", "1.0"),
        ("--lr-decay-iters", "--train-iters"),
    ]:
        section = text[text.index("\n  " + name + " ") :]
        section = section[: section.index("\n  --", 1)]
        assert f"(default: {default})" in " ".join(section.split()), section


def test_flags_have_the_documented_defaults_and_choices():
    """Hand-written expectations (the values the README and the paper's recipes rely on)."""
    actions = {a.option_strings[0]: a for a in _options(build_parser())}
    expected = {
        "--lr": 1e-5,
        "--adam-beta1": 0.9,
        "--adam-beta2": 0.98,
        "--clip-grad": 1.0,
        "--micro-batch-size": 1,
        "--train-iters": 100,
        "--rollout-batch-size": 32,
        "--n-samples-per-prompt": 4,
        "--rollout-temperature": 1.0,
        "--max-response-len": 1024,
        "--gopd-top-k": 64,
        "--fdiv-max-log-ratio": 20.0,
        "--fdiv-advantage": "corrected",
        "--weight-sync": "auto",
        "--weight-sync-bucket-mb": 512,
    }
    for name, value in expected.items():
        assert actions[name].default == value, name
    assert actions["--gopd-estimator"].choices == ["sampled", "full_vocab", "top_k"]
    assert actions["--fdiv-divergence"].choices == ["reverse_kl", "forward_kl", "js", "tv", "alpha"]
    assert actions["--rollout-engine"].choices == ["sglang", "cpu", "external"]
    assert isinstance(actions["--teacher-load"], argparse._AppendAction)
    assert isinstance(actions["--no-progress"], argparse._StoreTrueAction)


def test_command_line_reaches_each_component():
    argv = [
        *BASE,
        "--lr",
        "2e-6",
        "--lr-decay-style",
        "cosine",
        "--tensor-model-parallel-size",
        "2",
        "--sequence-parallel",
        "--gopd-estimator",
        "top_k",
        "--gopd-top-k",
        "8",
        "--fdiv-advantage",
        "naive",
        "--rollout-temperature",
        "0.6",
        "--rollout-urls",
        "http://a:1",
        "http://b:2",
        "--no-progress",
        "--chat-template-kwargs",
        '{"enable_thinking": false}',
        "--save",
        "runs/x",
        "--eval-grader",
        "exact",
        "--rollout-colocate",
        "--rollout-prompts-per-request",
        "4",
    ]
    cfg = build_config(parse_args(argv))
    assert cfg.optim.lr == 2e-6 and cfg.optim.lr_decay_style == "cosine"
    assert cfg.parallel.tp == 2 and cfg.parallel.sequence_parallel
    assert cfg.loss.estimator == "top_k" and cfg.loss.top_k == 8
    assert cfg.loss.fdiv_correction is False
    assert cfg.rollout.temperature == 0.6
    assert cfg.rollout.urls == ("http://a:1", "http://b:2")
    assert cfg.rollout.prompts_per_request == 4
    assert cfg.log.progress is False
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.checkpoint.save == "runs/x" and str(cfg.run_dir) == "runs/x"
    assert cfg.eval.grader == "exact"
    # cross-field: colocated servers release memory, which needs SGLang's memory saver
    assert cfg.rollout.colocate and cfg.rollout.sglang_enable_memory_saver
    # derived: one update per rollout batch by default, the student's init as the reference
    assert cfg.global_batch_size == 32 * 4 and cfg.updates_per_step == 1
    assert cfg.routing.references == {"default": "S"} and cfg.routing.lambdas == {"default": 1.0}


def test_yaml_keys_are_the_flags(tmp_path):
    """Every flag is a YAML key (its name with underscores) and gives the same config."""
    cli = [
        *BASE,
        "--adam-eps",
        "1e-6",
        "--gopd-aggregation",
        "seq_mean",
        "--offload-frozen",
        "--no-progress",
        "--ref-load",
        "R",
        "--gopd-lambda",
        "1.5",
        "--rollout-urls",
        "http://a:1",
        "--rollout-engine",
        "external",
    ]
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "student_load: S\nteacher_load: T\nprompt_data: p.jsonl\nadam_eps: 1.0e-6\n"
        "gopd_aggregation: seq_mean\noffload_frozen: true\nno_progress: true\nref_load: R\n"
        "gopd_lambda: 1.5\nrollout_urls: [http://a:1]\nrollout_engine: external\n"
    )
    assert build_config(parse_args(cli)) == build_config(parse_args(["--config", str(yaml_file)]))
    known = {a.dest for a in build_parser()._actions}
    assert {"adam_eps", "no_progress", "teacher_load", "gopd_lambda", "rollout_urls"} <= known


def test_a_config_error_names_the_flag():
    with pytest.raises(GopdError, match=r"^--gopd-tis-cap: tis_cap=0.5 must be >= 1"):
        build_config(parse_args([*BASE, "--gopd-tis-cap", "0.5"]))
    with pytest.raises(SystemExit):  # argparse's own message for a malformed JSON value
        parse_args([*BASE, "--chat-template-kwargs", "[1, 2]"])


# ---------------------------------------------------------------------------------- routing


def test_domain_routing_is_resolved_once():
    routing = Routing(
        teachers={"math": "/t/math", "default": "/t/any"},
        references={"math": "/r/math", "default": "/r/student"},
        lambdas={"math": 1.25, "chem": 0.5, "default": 1.0},
    )
    r = routing.resolve(["math", "code", "chem", "math"])
    assert r.domains == ["chem", "code", "math"]
    assert r["math"] == DomainRoute("math", teacher="math", reference="math", lam=1.25)
    # lambda == 1: no reference at all, so none is built or run for "code"
    assert r["code"] == DomainRoute("code", teacher="default", reference=None, lam=1.0)
    assert r["chem"] == DomainRoute("chem", teacher="default", reference="default", lam=0.5)
    assert r.teacher_keys == ["default", "math"] and r.reference_keys == ["default", "math"]
    assert r.needs_reference
    opd = Routing(teachers={"default": "/t"}, references={"default": "/s"}, lambdas={})
    assert not opd.resolve(["a", "b"]).needs_reference
    with pytest.raises(GopdError, match="domain 'bio' is not routed"):
        r["bio"]


def test_domain_routing_errors():
    only_math = Routing(teachers={"math": "/t"}, references={}, lambdas={})
    with pytest.raises(GopdError, match=r"domain 'code' has no teacher .*--teacher-load code="):
        only_math.resolve(["code"])
    no_ref = Routing(teachers={"math": "/t"}, references={"code": "/r"}, lambdas={"math": 2.0})
    with pytest.raises(
        GopdError, match=r"domain 'math' has lambda 2\.0 != 1 and needs a reference"
    ):
        no_ref.resolve(["math"])
    for bad in ("-1", "nan", "math=-0.5"):
        with pytest.raises(GopdError, match="lambda must be"):
            build_config(parse_args([*BASE, "--gopd-lambda", bad]))


# ---------------------------------------------------------------------------------- flags


@dataclass(frozen=True)
class _Toy:
    FLAG_GROUP = "toy"

    size: int = flag(3, help="a size")
    mode: Literal["a", "b"] = flag("a", name="--toy-mode", help="a mode")
    rate: float | None = flag(None, help="a rate", default_help="the size")
    switch: bool = flag(False, help="a switch")
    quiet: bool = flag(True, name="--no-quiet", invert=True, help="turn quiet off")
    names: tuple[str, ...] = flag((), help="some names")
    items: dict[str, int] = flag(
        name="--item",
        action="append",
        parse=lambda xs: {x.split("=")[0]: int(x.split("=")[1]) for x in xs},
        default_factory=dict,
        help="K=V, repeatable",
    )
    label: bool = flag(
        True,
        name="--label",
        choices=("on", "off"),
        parse=lambda v: v == "on",
        cli_default="on",
        help="on or off",
    )
    internal: int = 7  # not a flag


def test_flag_derivation_rules():
    p = argparse.ArgumentParser(formatter_class=FlagFormatter)
    add_flags(p, _Toy)
    dflt = config_from_args(_Toy, p.parse_args([]))
    assert dflt == _Toy()
    got = config_from_args(
        _Toy,
        p.parse_args(
            [
                "--size",
                "5",
                "--toy-mode",
                "b",
                "--rate",
                "0.5",
                "--switch",
                "--no-quiet",
                "--names",
                "x",
                "y",
                "--item",
                "a=1",
                "--item",
                "b=2",
                "--label",
                "off",
            ]
        ),
        internal=9,
    )
    assert got == _Toy(5, "b", 0.5, True, False, ("x", "y"), {"a": 1, "b": 2}, False, 9)
    with pytest.raises(SystemExit):
        p.parse_args(["--toy-mode", "c"])
    text = " ".join(p.format_help().split())
    assert "a rate (default: the size)" in text and "a switch (default: off)" in text
    assert "--internal" not in text
    with pytest.raises(TypeError, match="no help"):

        @dataclass
        class _NoHelp:
            x: int = flag(1, help="")

        add_flags(argparse.ArgumentParser(), _NoHelp)
