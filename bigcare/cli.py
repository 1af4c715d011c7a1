"""The ``bigcare`` command line: demo, restore, train, synth, convert, info."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from bigcare.errors import BigcareError
from bigcare.version import __version__

__all__ = ["main"]


def _split(texts) -> list[str]:
    """Tokens of a shape or size written ``64,256,256``, ``64x256x256`` or ``64 256 256``."""
    items = [texts] if isinstance(texts, str) else list(texts)
    return [t for text in items for t in text.replace("x", ",").replace(" ", ",").split(",") if t]


def _ints(text) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers like 64,256,256 or 64 256 256, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


class _Sizes(argparse.Action):
    """One syntax for every shape and size option: ``64,256,256``, ``64x256x256`` or ``64 256 256``."""

    def __init__(self, option_strings, dest, kind=int, **kwargs):
        self.kind = kind
        kwargs.setdefault("nargs", "+")
        kwargs.setdefault("metavar", "N")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            numbers = tuple(self.kind(v) for v in _split(values))
        except ValueError:
            parser.error(f"{option_string}: expected numbers like 64,256,256 or 64 256 256, got {' '.join(values)!r} "
                         "(write sizes with commas when paths follow the option)")
        if self.kind is int and (not numbers or min(numbers) < 1):
            parser.error(f"{option_string}: sizes must be positive whole numbers, got {' '.join(values)!r}")
        setattr(namespace, self.dest, numbers)


class _Deprecated(argparse.Action):
    """An old flag: still works for one release, says which flag replaces it."""

    def __init__(self, option_strings, dest, new: str, value=None, **kwargs):
        self.new, self.value = new, value
        if value is not None:
            kwargs["nargs"] = 0
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"bigcare: {option_string} is deprecated and will be removed; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.value if self.value is not None else values)


def _out(args, default: str) -> str:
    """The output folder of demo and synth: positional OUT (or --out, as earlier releases took it)."""
    from bigcare.errors import ConfigError

    if args.out is not None and args.out_option is not None and args.out != args.out_option:
        raise ConfigError(f"two output folders given: {args.out!r} and --out {args.out_option!r}; give one")
    return args.out or args.out_option or default


def _cmd_demo(args) -> int:
    from bigcare.demo import run_demo

    metrics = run_demo(_out(args, "bigcare-demo"), epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                       workers=args.workers, device=args.device, seed=args.seed, train=args.train)
    better = (metrics["restored"]["nrmse"] < metrics["input"]["nrmse"]
              and metrics["restored"]["ssim"] > metrics["input"]["ssim"])
    if not better:
        print("bigcare demo: the restoration is not better than the input", file=sys.stderr)
        return 1
    return 0


def _pairs(args) -> list[tuple[str, str]]:
    """(input, output) of every volume of a restore command line."""
    from bigcare.errors import ConfigError

    if args.output_dir is None:
        if len(args.paths) != 2:
            raise ConfigError(f"restore takes INPUT OUTPUT, or several inputs with --output-dir DIR; got "
                              f"{len(args.paths)} path(s) {args.paths} without --output-dir")
        return [(args.paths[0], args.paths[1])]
    from bigcare.runs.batch import expand_inputs, output_paths

    urls = expand_inputs(args.paths, None)
    return list(zip(urls, output_paths(urls, args.output_dir)))


def _model(args):
    """The model of a restore/plan command line: one path, or a list of member paths."""
    return args.model[0] if len(args.model) == 1 else list(args.model)


def _cmd_plan(args) -> int:
    from bigcare.runs.dryrun import format_plan, plan_restore

    for inp, out in _pairs(args):
        plan = plan_restore(inp, out, _model(args), block_shape=args.block_shape, tile_shape=args.tile_shape,
                            device=args.device, precision=args.precision, workers=args.workers,
                            overwrite=args.overwrite, ngff_version=args.ngff_version, output_dtype=args.output_dtype,
                            pyramid=args.pyramid, nan_fill=args.nan_fill, skip_background=args.skip_background,
                            backend=args.backend)
        print(format_plan(plan))
        if args.json:
            print(json.dumps(plan, default=str))
    return 0


def _cmd_restore(args) -> int:
    from bigcare.errors import BlockError, ConfigError
    from bigcare.runs.results import format_summary, summary_dict
    from bigcare.tasks.cluster import cluster_kwargs

    if args.dry_run:
        return _cmd_plan(args)

    options = dict(block_shape=args.block_shape, tile_shape=args.tile_shape, device=args.device,
                   precision=args.precision, overwrite=args.overwrite, ngff_version=args.ngff_version,
                   output_dtype=args.output_dtype, pyramid=args.pyramid, ship_model=args.ship_model,
                   nan_fill=args.nan_fill, progress=not args.quiet, backend=args.backend,
                   **({"skip_background": args.skip_background} if args.skip_background is not None else {}),
                   **({"preview": args.preview} if args.preview else {}),
                   **({"interval": args.interval} if args.interval != 0.9 else {}),
                   **cluster_kwargs(args))
    _pairs(args)  # the paths make sense
    if args.preview and args.output_dir is not None:
        raise ConfigError("--preview draws one volume: restore it on its own (INPUT OUTPUT --preview PNG)")
    try:
        if args.output_dir is None:
            from bigcare.runs.restore import restore

            results = [restore(args.paths[0], args.paths[1], _model(args), **options)]
        else:
            from bigcare.runs.batch import restore_many

            results = restore_many(args.paths, args.output_dir, _model(args), **options)
        failed = None
    except BlockError as exc:
        results, failed = getattr(exc, "results", []), exc
    for result in results:
        print(format_summary(result, name=result.input if len(results) > 1 else ""))
        if args.json:
            print(json.dumps(summary_dict(result), default=str))
    if failed is not None:
        print(f"bigcare restore: error: {failed}", file=sys.stderr)
        return 3
    return 0


def _cmd_convert(args) -> int:
    from bigcare.store.convert import tiff_to_ome_zarr

    volume = tiff_to_ome_zarr(args.input, args.output, voxel_size=args.voxel_size, unit=args.unit,
                              chunks=args.chunks, ngff_version=args.ngff_version, overwrite=args.overwrite)
    print(f"wrote {volume.url}: axes {volume.axis_names.upper()}, shape {volume.shape}, "
          f"{len(volume.levels)} level(s)")
    return 0


def _cmd_train(args) -> int:
    from bigcare.tasks.cluster import cluster_client, cluster_kwargs
    from bigcare.training import train

    named = cluster_kwargs(args)
    if args.scheduler or args.cluster != "local" or args.cluster_config or args.workers or args.dashboard is not True:
        # a cluster named on the command line replaces the config's cluster: section
        with cluster_client(named["scheduler"], cluster=named["cluster"], config=named["cluster_config"],
                            workers=named["workers"], security=named["security"],
                            dashboard=named["dashboard"], quiet=args.quiet) as client:
            result = train(args.config, client=client, progress=not args.quiet)
    else:
        result = train(args.config, progress=not args.quiet)
    print(f"trained {result.epochs} epoch(s) ({result.epochs - result.start_epoch} now); best validation loss "
          f"{min(result.val_loss):.4f} at epoch {result.best_epoch + 1}; model: {result.model_dir}"
          f"{'' if result.members else '/best'}{f' (ensemble of {len(result.members)})' if result.members else ''}")
    return 0


def _cmd_synth(args) -> int:
    from pathlib import Path

    from bigcare.synth import write_pair

    out = Path(_out(args, "bigcare-synth"))
    if args.kind != "nuclei" or args.psf or args.downsample > 1 or args.voxel_size:  # the blockwise generators
        from bigcare.synth.write import parse_psf, write_kind

        shape = args.shape or (512, 512)
        for noisy, clean in write_kind(out, args.kind, shape, count=args.count, psf=parse_psf(args.psf),
                                       voxel_size=args.voxel_size, photons=args.photons,
                                       background=args.background, downsample=args.downsample, seed=args.seed):
            print(f"wrote {noisy.url} {noisy.shape} and {clean.url} {clean.shape}")
        return 0
    for k in range(args.count):
        noisy, clean = write_pair(out / f"noisy_{k}.ome.zarr", out / f"clean_{k}.ome.zarr", args.shape or (64, 256, 256),
                                  photons=args.photons, seed=args.seed + 10 * k)
        print(f"wrote {noisy.url} and {clean.url} {clean.shape}")
    return 0


def _cmd_register(args) -> int:
    from bigcare.register import register_pair

    record = register_pair(args.low, args.high, args.out, search=args.search, tile=None if args.tile == 0 else args.tile,
                           overwrite=args.overwrite)
    print(f"registered {args.low} onto {args.high}: scale {record['scale']:.4f} (guess {record['scale_guess']:.4f}), "
          f"local field up to {record['field_max_high_pixels']:.2f} px, correlation {record['correlation']:.3f}; "
          f"wrote {args.out}/input.ome.zarr and {args.out}/target.ome.zarr")
    return 0


def _cmd_calibrate(args) -> int:
    from bigcare.errors import ConfigError
    from bigcare.runs.calibrate import calibrate

    if len(args.data) % 2:
        raise ConfigError(f"--data takes pairs: INPUT GROUND_TRUTH [INPUT GROUND_TRUTH ...], got {len(args.data)} path(s)")
    pairs = list(zip(args.data[::2], args.data[1::2]))
    report = calibrate(_model(args), pairs, recalibrate=args.recalibrate, device=args.device or "cpu")
    print("level     " + " ".join(f"{a:5.0%}" for a in report["levels"]))
    print("coverage  " + " ".join(f"{c:5.1%}" for c in report["coverage"]) + f"   ECE {report['ece']:.3f}")
    if args.recalibrate:
        print("after     " + " ".join(f"{c:5.1%}" for c in report["coverage_after"]) +
              f"   ECE {report['ece_after']:.3f}  (scale x{report['scale_factor']:.4g}, stored "
              f"{report['stored_scale_factor']:.4g}: every later restore applies it)")
    print(f"{report['voxels']:,} voxels of {len(pairs)} pair(s)" +
          (f"; wrote {report['json']} and {report.get('png', '')}" if "json" in report else ""))
    return 0


def _cmd_info(args) -> int:
    from bigcare.runs.info import info

    print(info(args.path))
    return 0


def _cmd_import_model(args) -> int:
    from bigcare.exchange.csbdeep import import_csbdeep

    out = import_csbdeep(args.path, args.out, pmin=args.pmin, pmax=args.pmax,
                         isotropic_factor=args.isotropic_factor, overwrite=args.overwrite)
    print(f"wrote bigcare model {out} from the CSBDeep model {args.path} (normalisation {args.pmin} / {args.pmax} "
          "percentiles)")
    return 0


def _cmd_export(args) -> int:
    from bigcare.exchange.bioimageio import export_bioimageio

    out = export_bioimageio(args.model, args.out, name=args.name, authors=args.author, license=args.license,
                            overwrite=args.overwrite)
    print(f"wrote bioimage.io package {out} (validated with bioimageio.spec; run `bioimageio test {out}` to "
          "reproduce its test outputs)")
    return 0


def _restore_arguments(p, add_cluster_arguments) -> None:
    """The arguments of restore and plan."""
    from bigcare.types import NGFF_VERSIONS, PRECISIONS

    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="INPUT OUTPUT, or with --output-dir: inputs (paths, fsspec URLs, globs, @list.txt)")
    p.add_argument("-o", "--output-dir", default=None, help="batch mode: write OUTPUT_DIR/<input name> per input")
    p.add_argument("--model", required=True, nargs="+", metavar="MODEL",
                   help="model folder (config.json + model.safetensors), or a bioimage.io package (.zip or folder); "
                   "several probabilistic models, or an ensemble folder, restore as an ensemble (outputs mean, "
                   "lower, upper, disagreement)")
    p.add_argument("--interval", type=float, default=0.9,
                   help="an ensemble's central interval level for its lower/upper outputs [0.9]")
    p.add_argument("--no-ship-model", dest="ship_model", action="store_false",
                   help="workers read the model folder by path (shared storage) instead of receiving its bytes once")
    p.add_argument("--block-shape", action=_Sizes, default=None,
                   help="block (write region) shape per spatial axis, e.g. 64,256,256 [from the model and device]")
    p.add_argument("--tile-shape", action=_Sizes, default=None,
                   help="largest write region of one network call per spatial axis [chosen with the blocks]")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N [cuda if available]")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (default): bf16 where the workers' device computes it natively (GPUs, CPUs with "
                   "AVX512_BF16 or AMX), else fp32; fp32 for bit-reproducible results")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"],
                   help="what runs the network: auto (default): OpenVINO on CPU workers where it is installed "
                   "(bigcare[openvino]) and runs the model (CARE and isotropic U-Nets; 1.35-1.7x torch in fp32 on "
                   "the project's CPU), torch elsewhere (GPUs, ensembles, other models); torch; or openvino")
    p.add_argument("--output-dtype", default="float32", help="output dtype [float32]")
    p.add_argument("--ngff-version", default="0.5", choices=NGFF_VERSIONS)
    p.add_argument("--overwrite", action="store_true", help="replace an output of another bigcare run")
    p.add_argument("--no-pyramid", dest="pyramid", action="store_false", help="skip the multiscale pyramid")
    p.add_argument("--nan-fill", type=float, default=None, metavar="VALUE",
                   help="read NaN/inf input voxels as VALUE (recorded in the output) instead of refusing the input")
    p.add_argument("--skip-background", type=float, default=None, metavar="THRESHOLD",
                   help="blocks whose whole read region has no input voxel above THRESHOLD are written with the "
                   "model's prediction of a constant background, without the network (off by default)")
    # the flags of the previous release, kept for one more
    p.add_argument("--block", dest="block_shape", type=_ints, action=_Deprecated, new="--block-shape",
                   help=argparse.SUPPRESS)
    p.add_argument("--dtype", dest="output_dtype", action=_Deprecated, new="--output-dtype", help=argparse.SUPPRESS)
    p.add_argument("--model-on-shared-storage", dest="ship_model", action=_Deprecated, new="--no-ship-model",
                   value=False, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print each run summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or cluster lines; summaries and errors only")
    p.add_argument("--dry-run", action="store_true", help="print the plan (as bigcare plan does) and write nothing")
    p.add_argument("--preview", default=None, metavar="PNG",
                   help="after the run, write XY/XZ slices of input and outputs through the busiest region to PNG")
    add_cluster_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bigcare`` command."""
    from bigcare.tasks.cluster import add_cluster_arguments
    from bigcare.types import NGFF_VERSIONS

    parser = argparse.ArgumentParser(prog="bigcare", description=__doc__)
    parser.add_argument("--version", action="version", version=f"bigcare {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic data -> train a small CARE net -> restore blockwise on a local cluster")
    p.add_argument("out", nargs="?", default=None,
                   help="output folder: new, empty or an earlier demo's (replaced); others are refused [bigcare-demo]")
    p.add_argument("--out", dest="out_option", default=None, help=argparse.SUPPRESS)  # the form of earlier releases
    p.add_argument("--train", action="store_true",
                   help="train a model here first (the full train-then-restore path) instead of the shipped demo model")
    p.add_argument("--epochs", type=int, default=12, help="training epochs with --train [12]")
    p.add_argument("--steps-per-epoch", type=int, default=20, help="steps per epoch [20]")
    p.add_argument("--steps", dest="steps_per_epoch", type=int, action=_Deprecated, new="--steps-per-epoch",
                   help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=None, help="local worker processes [1]")
    p.add_argument("--device", default=None, help="cpu or cuda [cuda if available]")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("restore", help="restore OME-Zarr volumes block by block with a model",
                       description="Restore one volume (INPUT OUTPUT) or several (INPUT... --output-dir DIR; "
                       "globs and @list.txt files of paths are expanded) on one dask cluster. Exit status: "
                       "0 done, 2 unusable input or option (nothing written), 3 some blocks failed (the "
                       "others are written; re-run to retry).")
    _restore_arguments(p, add_cluster_arguments)
    p.set_defaults(func=_cmd_restore)

    p = sub.add_parser("plan", help="what a restore would do (blocks, memory, outputs, resume?), writing nothing",
                       description="The same arguments as restore; prints the plan of each volume (as restore "
                       "--dry-run does) without starting a cluster or writing anything. Exit 2 where the "
                       "restore would refuse.")
    _restore_arguments(p, add_cluster_arguments)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("convert", help="stream a TIFF stack into OME-Zarr")
    p.add_argument("input", help="TIFF file")
    p.add_argument("output", help="output OME-Zarr path or URL")
    p.add_argument("--voxel-size", action=_Sizes, kind=float, default=None, metavar="S",
                   help="physical voxel size per spatial axis, e.g. 5,2,2 (Z Y X)")
    p.add_argument("--unit", default="micrometer", help="unit of the voxel size [micrometer]")
    p.add_argument("--chunks", action=_Sizes, default=None, help="chunk shape, e.g. 64,256,256")
    p.add_argument("--ngff-version", default="0.5", choices=NGFF_VERSIONS)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_convert)

    from bigcare.training.config import describe_schema

    p = sub.add_parser("train", help="train a CARE network from a YAML config (lazy patches from OME-Zarr)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="CONFIG keys (YAML; unknown keys are errors):\n" + describe_schema())
    p.add_argument("config", help="YAML training config")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines")
    add_cluster_arguments(p)  # override the config's cluster: section
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("synth", help="write synthetic (noisy, clean) OME-Zarr pairs for trying out training")
    p.add_argument("out", nargs="?", default=None, help="output folder [bigcare-synth]")
    p.add_argument("--out", dest="out_option", default=None, help=argparse.SUPPRESS)  # as demo takes it
    p.add_argument("--shape", action=_Sizes, default=None,
                   help="Z,Y,X or Y,X [64,256,256 for nuclei, 512,512 for the others]")
    p.add_argument("--count", type=int, default=2, help="number of pairs [2]")
    p.add_argument("--photons", type=float, default=6.0, help="photons per unit intensity (lower: noisier) [6]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=["nuclei", "tubules", "granules", "tubules+granules"], default="nuclei",
                   help="what the clean image holds [nuclei]; tubules and granules are written chunk by chunk")
    p.add_argument("--psf", default=None, metavar="KIND:key=value,...",
                   help="blur with a PSF: gaussian:fwhm=0.25, widefield:na=0.8,wavelength=0.52, "
                   "confocal:na=1.4,wavelength=0.52,excitation_wavelength=0.488,refractive_index=1.518, "
                   "file:path=bead.tif,voxel_size=0.2/0.1/0.1 (micrometres)")
    p.add_argument("--voxel-size", action=_Sizes, kind=float, default=None,
                   help="voxel size of the clean image in micrometres [0.04 (2D), 0.1 (3D)]")
    p.add_argument("--downsample", type=int, default=1, help="camera pixels per clean voxel and axis [1]")
    p.add_argument("--background", type=float, default=0.0, help="Perlin-like background amplitude [0]")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("import-model", help="turn a model trained elsewhere (CSBDeep) into a bigcare model folder",
                       description="Read a CSBDeep CARE model folder (config.json + weights_best.h5, read with h5py, "
                       "never unpickled) and write a bigcare model folder that predicts the same. Exit 2 when the "
                       "config holds something bigcare cannot represent (the message names the key).")
    p.add_argument("format", choices=["csbdeep"], help="what PATH is")
    p.add_argument("path", help="the CSBDeep model folder")
    p.add_argument("out", help="the bigcare model folder to write")
    p.add_argument("--pmin", type=float, default=2.0, help="low normalisation percentile [2: CSBDeep's predict default]")
    p.add_argument("--pmax", type=float, default=99.8, help="high normalisation percentile [99.8]")
    p.add_argument("--isotropic-factor", type=float, default=None, metavar="F",
                   help="the model is an IsotropicCARE trained for axial factor F: import it as bigcare's isotropic kind")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")
    p.set_defaults(func=_cmd_import_model)

    p = sub.add_parser("export", help="write a bigcare model as a bioimage.io model package (.zip)",
                       description="Package a bigcare model folder for the bioimage.io model zoo (spec 0.5: "
                       "pytorch_state_dict + torchscript + onnx weights, percentile preprocessing, halo, test "
                       "tensors, README). The package is validated before the command returns.")
    p.add_argument("model", help="bigcare model folder")
    p.add_argument("out", help="the package to write (.zip)")
    p.add_argument("--name", default=None, help="model name in the zoo [the folder's name]")
    p.add_argument("--author", action="append", default=None, help="author name (repeat for several) [your login]")
    p.add_argument("--license", default="CC-BY-4.0", help="SPDX license of the weights [CC-BY-4.0]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("register", help="align a low- and a high-resolution image of one field of view (GAN/CARE pairs)",
                       description="Global scale + shift by cross-correlation (the scale guess is the ratio of the "
                       "voxel sizes), then a local field from tile-wise template matching. Writes OUT/input.ome.zarr "
                       "(LOW resampled onto HIGH's grid) and OUT/target.ome.zarr, cropped to the overlap, and "
                       "OUT/registration.json.")
    p.add_argument("low", help="low-resolution OME-Zarr image (YX or ZYX)")
    p.add_argument("high", help="high-resolution OME-Zarr image of the same field of view")
    p.add_argument("out", help="output folder")
    p.add_argument("--search", type=float, default=0.1, help="relative scale range searched around the guess [0.1]")
    p.add_argument("--tile", type=int, default=96, help="tile of the local refinement in high pixels; 0: none [96]")
    p.add_argument("--overwrite", action="store_true", help="replace existing output images")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("calibrate", help="coverage of a probabilistic model's (or ensemble's) intervals on held-out pairs",
                       description="Predict held-out (input, ground truth) pairs (each read whole: give crops), measure "
                       "the coverage of the central intervals at 10%%..90%% and the expected calibration error; write "
                       "calibration.json and calibration.png into the model folder. --recalibrate fits one factor for "
                       "every scale and stores it in the model (every later restore applies it).")
    p.add_argument("model", nargs="+", help="probabilistic model folder, ensemble folder, or member folders")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="INPUT GROUND_TRUTH pairs (OME-Zarr)")
    p.add_argument("--recalibrate", action="store_true", help="fit and store one scale factor")
    p.add_argument("--device", default=None, help="cpu or cuda [cpu]")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("info", help="print axes, shape, dtype, chunks, scales and pyramid of an OME-Zarr image")
    p.add_argument("path", help="OME-Zarr image (path or fsspec URL)")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``bigcare`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # a batch system's kill: the same clean stop as Ctrl-C
    try:
        return args.func(args)
    except BigcareError as exc:
        print(f"bigcare {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"bigcare {args.command}: interrupted; finished blocks are kept, run the same command again to "
              "resume", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be (clusters close on the way out)."""


def _terminated(signum, frame):
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
