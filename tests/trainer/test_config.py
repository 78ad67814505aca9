"""ASFTConfig: defaults, the four methods as two switches, and errors that name the field and the fix."""

from __future__ import annotations

import dataclasses

import pytest
from trl import SFTConfig

from asft_trl import ASFTConfig

NEW_FIELDS = [
    "kl_coef",
    "kl_direction",
    "loss_type",
    "ref_model_name_or_path",
    "ref_model_init_kwargs",
    "disable_dropout",
]


def test_defaults_are_the_papers_asft(tmp_path):
    args = ASFTConfig(output_dir=str(tmp_path))
    assert isinstance(args, SFTConfig)
    assert (args.kl_coef, args.kl_direction, args.loss_type) == (0.05, "forward", "dft")
    assert args.method_name == "ASFT"


@pytest.mark.parametrize(
    "loss_type, kl_coef, name",
    [("nll", 0.0, "SFT"), ("dft", 0.0, "DFT"), ("nll", 0.1, "SFT+KL"), ("dft", 0.1, "ASFT")],
)
def test_four_methods_are_two_switches(tmp_path, loss_type, kl_coef, name):
    args = ASFTConfig(output_dir=str(tmp_path), loss_type=loss_type, kl_coef=kl_coef)
    assert args.method_name == name
    assert args.anchored is (name in ("SFT+KL", "ASFT"))  # the one place that says whether there is an anchor


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("kl_coef", -0.1, ["kl_coef=-0.1", ">= 0"]),
        ("kl_coef", float("nan"), ["kl_coef=nan", "finite"]),
        ("kl_coef", float("inf"), ["kl_coef=inf", "finite"]),
        ("kl_coef", "lots", ["kl_coef='lots'", "float"]),
        ("kl_direction", "backward", ["kl_direction='backward'", "'forward'", "'reverse'"]),
        ("loss_type", "focal", ["loss_type='focal'", "'dft'", "'nll'"]),
        ("ref_model_init_kwargs", "[1, 2]", ["ref_model_init_kwargs"]),
    ],
)
def test_bad_values_name_the_field_the_value_and_the_fix(tmp_path, field, value, words):
    with pytest.raises(ValueError) as error:
        ASFTConfig(output_dir=str(tmp_path), **{field: value})
    for word in words:
        assert word in str(error.value)


def test_every_new_field_is_documented_once_and_help_says_the_same():
    """Each field ASFTConfig declares has one docstring entry, whose type and default are the field's, and `--help`
    prints that entry (filled from it at import): the two can no longer drift apart."""
    import ast

    from asft_trl.trainer.config import _as_help, parameter_docs

    fields = {f.name: f for f in dataclasses.fields(ASFTConfig)}
    docs = parameter_docs(ASFTConfig)
    # Every field ASFTConfig declares (its own or a changed default), not only a list kept by hand (the
    # precompute_ref_* fields were missed)
    added = set(ASFTConfig.__dict__["__annotations__"]) & set(fields)
    assert set(NEW_FIELDS) <= added and "precompute_ref_topk" in added
    for name in sorted(added):
        assert name in docs, f"{name} is missing from the docstring"
        doc, f = docs[name], fields[name]
        assert f.metadata.get("help") == _as_help(doc.text), f"{name}: --help is not its docstring entry"
        # The class's own annotation (a string, under __future__): HfArgumentParser rewrites `f.type` in place
        annotation = ASFTConfig.__dict__["__annotations__"][name]
        declared = tuple(t for t in annotation.split(" | ") if t != "None")
        assert doc.types == declared, f"{name}: the docstring says {doc.types}, the field is {annotation}"
        if doc.default is None:
            assert f.default is None, f"{name}: defaults to {f.default!r}, which the docstring does not say"
        else:
            assert ast.literal_eval(doc.default) == f.default, f"{name}: docstring default {doc.default}"
    # What the docstring documents beyond its own fields (changed TRL defaults) are fields too
    assert set(docs) <= set(fields)
    # The text reached --help as the docstring has it, e.g. the estimator sentence the help had lost
    assert "With a per-token kl_estimator" in fields["precompute_ref_log_probs"].metadata["help"]
    assert fields["kl_direction"].metadata["help"].startswith("'forward' computes KL(reference || policy)")


def test_dict_field_accepts_json_from_the_command_line(tmp_path):
    args = ASFTConfig(output_dir=str(tmp_path), ref_model_init_kwargs='{"dtype": "bfloat16"}')
    assert args.ref_model_init_kwargs == {"dtype": "bfloat16"}


def test_this_machine_needs_no_extra_flags(tmp_path):
    """Whatever the machine: bf16 is on where a bf16-capable GPU is (TRL's default) and off elsewhere, so a CPU-only
    run needs no flag; pinned memory only where there is an accelerator to pin for."""
    from asft_trl.trainer import config

    args = ASFTConfig(output_dir=str(tmp_path))
    assert args.bf16 is config._bf16_accelerator_available()
    assert args.dataloader_pin_memory is config._accelerator_available()


@pytest.mark.parametrize(
    "bf16_gpu, given, expected",
    [
        (False, {}, False),  # a CPU-only machine: off, or transformers refuses TRL's default
        (True, {}, None),  # left to TRL, which turns it on
        (False, {"fp16": True}, None),  # fp16 asked for: bf16 is not touched
        (False, {"bf16": True}, True),  # asked for explicitly: kept (transformers says whether the machine can)
        (True, {"bf16": False}, False),
    ],
)
def test_bf16_default_follows_the_machine(tmp_path, monkeypatch, bf16_gpu, given, expected):
    """What ASFTConfig hands to TRL's own post-init, on a machine with and without a bf16-capable GPU, whichever
    machine runs the test (TRL's and transformers' post-init are stubbed out: they would judge this machine)."""
    from asft_trl.trainer import config

    monkeypatch.setattr(config, "_bf16_accelerator_available", lambda: bf16_gpu)
    monkeypatch.setattr(SFTConfig, "__post_init__", lambda self: None)
    assert ASFTConfig(output_dir=str(tmp_path), **given).bf16 is expected
