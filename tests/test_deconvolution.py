"""The deconvolution CARE example: its training YAML validates and its synth command is the CLI's."""

import shlex
from pathlib import Path

from bigcare.cli import build_parser
from bigcare.synth.write import parse_psf
from bigcare.training import load_train_config

EXAMPLE = Path(__file__).parent.parent / "examples" / "deconvolution_care.yaml"


def _commented_command(name: str) -> list[str]:
    """The ``bigcare NAME ...`` command of the example's comments (continuation lines joined)."""
    lines = [line[1:].strip() for line in EXAMPLE.read_text().splitlines() if line.startswith("#")]
    k = next(i for i, line in enumerate(lines) if line.startswith(f"bigcare {name} "))
    command = lines[k]
    while command.endswith("\\"):
        k += 1
        command = command[:-1] + " " + lines[k]
    return shlex.split(command)[1:]


def test_the_deconvolution_example_is_a_valid_2d_care_config_on_128x128_patches():
    cfg = load_train_config(EXAMPLE)
    assert cfg.data.patch_shape == [128, 128] and cfg.network.ndim == 2 and cfg.training.method == "care"
    assert all(s.target is not None for s in cfg.data.sources)
    # the GAN variant the comment describes validates too
    gan = load_train_config({**cfg.model_dump(mode="json", exclude={"training": {"loss"}}),
                             "training": {"method": "gan", "lambda": 1.0, "nu": 1.0}, "network": {"n_filter_base": 32}})
    assert gan.network.pooling == "avg" and gan.training.method == "gan"


def test_the_examples_synth_command_parses_and_writes_what_the_config_reads(tmp_path):
    args = build_parser().parse_args(_commented_command("synth"))
    assert args.kind == "tubules+granules" and parse_psf(args.psf)["kind"] == "widefield"
    out = Path(args.out)
    sources = load_train_config(EXAMPLE).data.sources
    assert {Path(s.input).parent for s in sources} == {out}
    assert max(int(Path(s.input).name.split("_")[1].split(".")[0]) for s in sources) < args.count


def test_the_examples_train_and_restore_commands_parse():
    args = build_parser().parse_args(_commented_command("restore"))
    assert args.model == [str(Path(load_train_config(EXAMPLE).model_dir) / "best")]
    assert build_parser().parse_args(_commented_command("train")).command == "train"
