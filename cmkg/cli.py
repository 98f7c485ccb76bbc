"""The ``cmkg`` command line.

    cmkg data synth --domain NAME --num N --size PX --out DIR [--seed S]
    cmkg data show DATASET [--split S] [--n 32] --out SHEET.png   # a contact sheet
    cmkg data convert {rhd,stb,freihand} ROOT --out DIR [--size PX] [--margin M]
                      [--val-fraction F] [--seed S] [--versions g,h,s,a] [--test-fraction F]
    cmkg train {teacher,student,kd,meta,target} [CONFIG] [RESOURCES]
    cmkg tune SPACE.yaml [CONFIG] [--resume] [--storage URL] [--trials N]
              [--time-budget SECONDS] [--address ADDR] [--cpus-per-worker N] [--gpus-per-worker G]
    cmkg ablate ABLATION.yaml... [CONFIG] [RESOURCES] [--seeds N] [--choice-seeds K] [--dry-run]
                [--report DIR] [--force]
    cmkg reproduce [same options] [--phi-seeds N]   # ablations/table{1,2,3}.yaml, the phi
                                              # diagnostics on seeds 0..N-1 (default 3), the report
    cmkg phi [CONFIG] [RESOURCES] [--seeds N] [--permutations K] [--report DIR] [--force]
             [--dry-run]
    cmkg report [--report DIR] [--results DIR]    # tables and figures from the records only
    cmkg report tune SWEEP_DIR [--storage URL] [--report DIR]   # a sweep's summary from its study
    cmkg runs ls [--store DIR] [--stage S] [--where KEY=VALUE ...] [--seed N]
    cmkg runs show KEY [--store DIR] [--report DIR]   # lineage, config, metrics, references
    cmkg runs diff KEY KEY [--store DIR]              # what differs, side by side
    cmkg runs gc [--store DIR] [--report DIR] [--dry-run]   # remove what nothing references
    cmkg eval-predictions --pred P.npy --gt G.npy [--vis V.npy] [--root-relative]
    cmkg figure params --without DIR --with DIR [--prior DIR] --out PNG   # Fig. 5
    cmkg config show [CONFIG]

    CONFIG     --config FILE|PRESET (default smoke), --set KEY=VALUE ..., --store DIR
    RESOURCES  --workers N, --cpus-per-worker N, --gpus-per-worker G, --address ADDR

One spelling per concept: ``--store`` is the artifact store (``run.store``) everywhere,
``--report`` a report folder, ``--out`` a file or folder a command creates; a *worker* is a
unit of work with its own CPUs and GPUs: a Ray Train worker, a stage task of the ablation
runner or a sweep's trial. ``--workers N`` is the number of Ray Train data-parallel workers per
stage, 0 (the default everywhere) training in-process: in this process, in the stage's Ray task
or in the trial.

``cmkg reproduce`` and ``cmkg ablate`` write their report and records into
``{store}/reports/{preset}`` unless ``--report`` names another folder; the committed
``reports/`` is written only when asked (``--report reports``), and records of another preset
or other seeds are replaced only with ``--force``. ``cmkg reproduce`` runs ``cmkg phi``'s
diagnostics after the tables, into the same folder (``--phi-seeds N``, 0 skips them); its
records of another preset or other seeds stop the run before the tables train, as theirs do.

User errors (bad config, YAML, data, arguments) print one message naming the file and key and
exit with status 2; nothing half-written is left behind. Flags are spelled out (``--seed`` is
not taken for ``--seeds``); an unknown flag is named, with its new name where it was renamed
(``RENAMED``: ``cmkg report --out`` is now ``--report``).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

from cmkg.errors import UserError

# flags renamed since they shipped, per command: {old: new} (git log -S'add_argument("--' --
# cmkg/cli.py); an old spelling gets "OLD was renamed NEW" instead of a puzzling error
RENAMED = {
    "report": {"--out": "--report"},
    **{c: {"--out": "--store"} for c in ("train", "tune", "config show")},
    **{c: {"--out": "--store", "--cpus-per-task": "--cpus-per-worker",
           "--gpus-per-task": "--gpus-per-worker"} for c in ("ablate", "reproduce")},
}


class _Parser(argparse.ArgumentParser):
    """Every parser of the CLI (the subparsers too, through ``parser_class``): no abbreviated
    flags (``--seed`` is not ``--seeds``, ``--stor`` not ``--store``), and an unknown flag is
    the error, named by the command that saw it, whatever else it made go wrong."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        # the CLI only parses whole command lines: what is left over is an error here, where
        # the usage and the renamed flags are this command's, not at the top-level parser
        self._argv = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _unknown_flags(self) -> list[str]:
        """The flags of this command line that this (leaf) parser does not define; a parser
        with subcommands leaves theirs to them."""
        if self._subparsers is not None:
            return []
        out = []
        for arg in self._argv:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            if (len(arg) > 1 and arg[0] in self.prefix_chars
                    and name not in self._option_string_actions
                    and not self._negative_number_matcher.match(arg)):
                out.append(name)
        return out

    def error(self, message):
        unknown = self._unknown_flags()
        if unknown:  # the cause, e.g. `report --out X` otherwise fails on X: "invalid choice"
            renamed = RENAMED.get(self.prog.removeprefix("cmkg "), {})
            flags = sorted(f for f in self._option_string_actions if f.startswith("--"))
            hints = []
            for flag in unknown:  # the flags it abbreviates, else the nearest (a typo)
                near = ([f for f in flags if f.startswith(flag)]
                        or difflib.get_close_matches(flag, flags, n=1))
                if flag in renamed:
                    hints.append(f"{flag} was renamed {renamed[flag]}")
                elif near:
                    hints.append(f"{flag + ': ' if len(unknown) > 1 else ''}did you mean "
                                 f"{' or '.join(near[:3])}?")
            message = (f"unrecognized arguments: {' '.join(unknown)}"
                       + (f" ({'; '.join(hints)})" if hints else ""))
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="smoke",
                   help="a preset (smoke, cpu, paper) or a YAML file (default: smoke)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config entry, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--store", help="artifact store: a folder or a URI (same as --set "
                   "run.store=DIR; default: the config's, runs)")


def _add_address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (auto, host:port); default: "
                   "RAY_ADDRESS, else a local Ray started for this command")


def _add_resource_args(p: argparse.ArgumentParser, cpus_default: int | None) -> None:
    p.add_argument("--workers", type=int, default=0,
                   help="Ray Train data-parallel workers per stage (default 0: train in-process)")
    p.add_argument("--cpus-per-worker", type=int, default=cpus_default,
                   help="CPUs (torch threads) per worker: a stage task, or a Ray Train worker "
                   f"(default: {cpus_default or 'run.threads, else a share of the cluster'})")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per worker (default 0)")
    _add_address_arg(p)


def _slot_list(text: str) -> list[int]:
    """``--predict 1,2,8``: slot counts >= 1."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected slot counts >= 1 such as 1,2,8, got {text!r}")
    return out


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    _add_resource_args(p, cpus_default=1)
    p.add_argument("--seeds", type=int, help="N report seeds: 0..N-1, or the first N after "
                   "the choice seeds (default: the ablation file's)")
    p.add_argument("--choice-seeds", type=int, metavar="K",
                   help="make the choose rows' choices on seeds 0..K-1 and report on other "
                   "seeds; 0: the report seeds choose (default: the ablation file's)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cells and stages, cached and to train, and the work; no training")
    p.add_argument("--predict", type=_slot_list, metavar="N[,N...]",
                   help="with --dry-run: the predicted wall time on N one-stage task slots "
                   "(e.g. 1,2,8), the critical path and the stage time per kind, from the "
                   "store's finished stages (docs/performance.md)")
    p.add_argument("--report", help="report folder (default: {store}/reports/{preset}; "
                   "the committed one is --report reports)")
    p.add_argument("--force", action="store_true",
                   help="replace records of another preset or other seeds in the report folder")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cmkg", description="Cross-modal knowledge generalization "
                     "(Knowledge as Priors, CVPR 2020)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_data_parsers(sub)
    _add_training_parsers(sub)
    _add_result_parsers(sub)
    _add_phi_parser(sub)
    return parser


def _add_phi_parser(sub) -> None:
    phi = sub.add_parser("phi", help="diagnostics of phi_META that can detect per-weight "
                         "signal: split-half reliability, a teacher-free control, phi against "
                         "|theta|, its change and the Fisher diagonal (docs/phi-diagnostics.md)")
    _add_config_args(phi)
    _add_resource_args(phi, cpus_default=1)
    phi.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    phi.add_argument("--permutations", type=int, default=100, metavar="K",
                     help="permutations of each comparison's null (default 100)")
    phi.add_argument("--report", help="report folder (default: {store}/reports/{preset}); "
                     "phi.md, phi.csv and results/phi.json go there")
    phi.add_argument("--force", action="store_true",
                     help="replace phi records of another preset or other seeds")
    phi.add_argument("--dry-run", action="store_true",
                     help="print the variants' stages, cached and to train; no training")


def _add_data_parsers(sub) -> None:
    from cmkg.domains import DOMAINS  # torch-free: --help stays light

    data = sub.add_parser("data", help="create and inspect datasets").add_subparsers(
        dest="data_command", required=True, parser_class=_Parser)
    syn = data.add_parser("synth", help="render a paired synthetic hand dataset")
    syn.add_argument("--domain", required=True, choices=sorted(DOMAINS))
    syn.add_argument("--num", type=int, required=True, help="number of samples")
    syn.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    syn.add_argument("--out", required=True, help="output folder")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--split", type=float, nargs=3, default=[0.8, 0.1, 0.1],
                     metavar=("TRAIN", "VAL", "TEST"))
    _add_convert_parser(data)
    show = data.add_parser("show", help="a contact sheet: RGB, depth and the 2D joints over "
                           "the RGB per sample, captioned with domain, sequence and split")
    show.add_argument("dataset", metavar="DATASET", help="a dataset folder (cmkg data synth, "
                      "cmkg data convert)")
    show.add_argument("--split", help="train, val or test (default: samples from every split)")
    show.add_argument("--n", type=int, default=32, help="number of samples (default 32)")
    show.add_argument("--out", required=True, help="PNG to write")
    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(
        dest="config_command", required=True, parser_class=_Parser)
    show = cfg.add_parser("show", help="print the resolved config as YAML")
    _add_config_args(show)


def _add_training_parsers(sub) -> None:
    """train, tune, ablate, reproduce."""
    from cmkg.config import STAGES

    train = sub.add_parser("train", help="train and evaluate one stage (and its missing inputs)")
    train.add_argument("stage", choices=list(STAGES))
    _add_config_args(train)
    _add_resource_args(train, cpus_default=None)

    tune = sub.add_parser("tune", help="hyperparameter sweep: Ray Tune trials, Optuna sampling")
    tune.add_argument("space", help="search-space YAML (see tune_spaces/)")
    _add_config_args(tune)
    tune.add_argument("--resume", action="store_true",
                      help="continue the sweep this command started before")
    tune.add_argument("--storage", help="Optuna storage URL (default: SQLite beside the results)")
    _add_address_arg(tune)
    tune.add_argument("--trials", type=int, help="number of trials (overrides the space's)")
    tune.add_argument("--time-budget", type=float, metavar="SECONDS",
                      help="stop the sweep after this many seconds (overrides time_budget_s)")
    tune.add_argument("--cpus-per-worker", type=int,
                      help="CPUs per trial (overrides the space's cpus_per_worker)")
    tune.add_argument("--gpus-per-worker", type=float,
                      help="GPUs per trial (overrides the space's gpus_per_worker)")

    ablate = sub.add_parser("ablate", help="regenerate a table of the paper: rows x seeds, "
                            "shared stages trained once, records and the report")
    ablate.add_argument("ablation", nargs="+", help="ablation file(s), e.g. ablations/table2.yaml")
    _add_run_args(ablate)
    repro = sub.add_parser("reproduce", help="Tables 1-3 and Figures 4-5 (ablations/*.yaml), "
                           "then the phi diagnostics (cmkg phi), then the report")
    repro.add_argument("--ablations", default=None,
                       help="folder of the ablation files (default: ablations/ of this checkout)")
    repro.add_argument("--phi-seeds", type=int, default=3, metavar="N",
                       help="the phi diagnostics (cmkg phi) on seeds 0..N-1 after the tables, "
                       "into the same report folder (default 3; 0: skip them)")
    _add_run_args(repro)


def _add_result_parsers(sub) -> None:
    """report, runs, eval-predictions, figure."""
    from cmkg.config import STAGES

    rep = sub.add_parser("report", help="rebuild a report folder's tables and figures from its "
                         "stored result records only; `report tune SWEEP_DIR`: a sweep's "
                         "trials.parquet and plots")
    rep.add_argument("mode", nargs="?", choices=["tune"],
                     help="tune: rebuild a sweep's trials.parquet and plots from its study")
    rep.add_argument("sweep", nargs="?", help="the sweep folder ({run.store}/_tune/NAME)")
    rep.add_argument("--report", default=None, help="report folder (default: reports); with "
                     "tune: where to write the sweep's summary to commit, e.g. "
                     "reports/sweeps/NAME (default: the sweep folder)")
    rep.add_argument("--results", default=None,
                     help="records folder (default: REPORT/results)")
    rep.add_argument("--storage", help="report tune: Optuna storage URL (default: the store's "
                     "_tune/optuna.db)")

    runs = sub.add_parser("runs", help="find finished artifacts in a store").add_subparsers(
        dest="runs_command", required=True, parser_class=_Parser)
    ls = runs.add_parser("ls", help="list artifacts: key, stage, seed, test EPE, date and the "
                         "config entries that differ from their preset")
    ls.add_argument("--store", help="artifact store (default: the config's run.store, runs)")
    ls.add_argument("--config", default=None, help="take run.store from this preset or file")
    ls.add_argument("--stage", choices=list(STAGES), help="only this stage")
    ls.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="only artifacts whose config has KEY=VALUE (repeatable)")
    ls.add_argument("--seed", type=int, help="only this run.seed")
    show = runs.add_parser("show", help="one artifact: lineage, the config entries that differ "
                           "from its preset, metrics, and the records and sweeps naming it")
    show.add_argument("key", metavar="KEY", help="a folder name or a unique prefix of a key")
    diff = runs.add_parser("diff", help="two artifacts' differing config entries and metrics")
    diff.add_argument("keys", metavar="KEY", nargs=2, help="folder names or key prefixes")
    gc = runs.add_parser("gc", help="remove the artifacts that no result record, phi.json or "
                         "sweep's best.yaml names (directly or as an input), and leftover "
                         ".partial folders")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed")
    for p in (show, diff, gc):
        p.add_argument("--store", help="artifact store (default: the config's run.store, runs)")
        p.add_argument("--config", default=None, help="take run.store from this preset or file")
    for p in (show, gc):
        p.add_argument("--report", action="append", default=[], metavar="DIR",
                       help="also read the result records in DIR/results (repeatable; "
                       "{store}/reports/*/results and {store}/_results are always read)")

    ev = sub.add_parser("eval-predictions", help="EPE / PCK / AUC of saved predictions as JSON")
    ev.add_argument("--pred", required=True, help="(N, 21, 3) predictions, mm")
    ev.add_argument("--gt", required=True, help="(N, 21, 3) ground truth, mm, same frame")
    ev.add_argument("--vis", help="(N, 21) visibility (bool or 0/1); default: all visible")
    ev.add_argument("--root-relative", action="store_true",
                    help="subtract joint 0 (wrist) from both before comparing")

    figure = sub.add_parser("figure", help="figures from finished stage folders").add_subparsers(
        dest="figure_command", required=True, parser_class=_Parser)
    f5 = figure.add_parser("params", help="Fig. 5: histograms of theta without / with R, and phi")
    f5.add_argument("--without", required=True, help="target stage folder trained with form none")
    f5.add_argument("--with", dest="with_", required=True,
                    help="target stage folder trained with the learned prior")
    f5.add_argument("--prior", help="the meta stage folder holding phi")
    f5.add_argument("--out", required=True, help="PNG to write")


# -- cmkg data convert -----------------------------------------------------------------------

def _add_convert_parser(data) -> None:
    conv = data.add_parser("convert", help="convert a downloaded real dataset into shards")
    kinds = conv.add_subparsers(dest="dataset", required=True, parser_class=_Parser)
    helps = {"rhd": "RHD (RHD_published_v2 folder): RGB + depth, the source set",
             "stb": "STB (folder with images/ and labels/): RGB, the target set, paper split",
             "freihand": "FreiHAND (FreiHAND_pub_v2 folder): versions g,h,s,a as separate sets"}
    for name, text in helps.items():
        p = kinds.add_parser(name, help=text)
        p.add_argument("root", help="the unpacked dataset folder")
        p.add_argument("--out", required=True, help="output folder" + (
            " (receives freihand-<v> per version)" if name == "freihand" else ""))
        p.add_argument("--size", type=int, default=256, help="crop size in pixels (default 256)")
        p.add_argument("--margin", type=float, default=1.5,
                       help="crop side / the 2D joints' larger extent (default 1.5)")
        p.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of the training pool carved out as val (default 0.1)")
        p.add_argument("--seed", type=int, default=0, help="seed of the val/test carving")
        if name == "freihand":
            p.add_argument("--versions", default="g,h,s,a",
                           help="comma-separated versions to convert (default g,h,s,a)")
            p.add_argument("--test-fraction", type=float, default=0.1,
                           help="share of the unique samples held out as test (default 0.1)")


def _cmd_convert(args) -> int:
    from cmkg.data.convert import CONVERTERS

    fractions = [args.val_fraction] + ([args.test_fraction] if args.dataset == "freihand" else [])
    if not 16 <= args.size <= 1024 or not 1.0 <= args.margin <= 4.0:
        raise UserError(f"--size must be in [16, 1024] and --margin in [1, 4] "
                        f"(got {args.size}, {args.margin})")
    if min(fractions) < 0 or sum(fractions) >= 0.9:
        raise UserError(f"--val-fraction and --test-fraction must be >= 0 and leave most "
                        f"samples for training (got {fractions})")
    kwargs = dict(size=args.size, margin=args.margin, val_fraction=args.val_fraction,
                  seed=args.seed)
    if args.dataset == "freihand":
        kwargs.update(versions=[v.strip() for v in args.versions.split(",") if v.strip()],
                      test_fraction=args.test_fraction)
    result = CONVERTERS[args.dataset](args.root, args.out, **kwargs)
    outputs = ({f"{args.out}/freihand-{v}": m for v, m in result.items()}
               if args.dataset == "freihand" else {args.out: result})
    for out, m in outputs.items():
        print(json.dumps({"out": out, "num": m["num"], "fingerprint": m["fingerprint"],
                          "splits": {k: v["num"] for k, v in m["splits"].items()}}))
    return 0


def _cmd_data(args) -> int:
    return {"convert": _cmd_convert, "synth": _cmd_synth,
            "show": _cmd_data_show}[args.data_command](args)


def _cmd_data_show(args) -> int:
    from cmkg.data.sheet import contact_sheet

    sheet = contact_sheet(args.dataset, args.out, split=args.split, n=args.n)
    shown = ", ".join(f"{sheet.splits.count(s)} {s}" for s in dict.fromkeys(sheet.splits))
    print(f"{sheet.out}: {len(sheet.ids)} samples ({shown}), {sheet.size[0]}x{sheet.size[1]} px")
    return 0


def _load_config(args):
    from cmkg import config

    return config.load(args.config, _overrides(args))


def _overrides(args) -> list[str]:
    """--set entries, then --store (and, for train, --cpus-per-worker) as config entries."""
    out = list(args.overrides) + ([f"run.store={args.store}"] if args.store else [])
    if args.command == "train" and args.cpus_per_worker is not None:
        out.append(f"run.threads={args.cpus_per_worker}")
    return out


def _check_resources(args) -> None:
    bad = [f"--{k.replace('_', '-')} {v}" for k, v, low in (
        ("workers", args.workers, 0), ("cpus_per_worker", args.cpus_per_worker, 1),
        ("gpus_per_worker", args.gpus_per_worker, 0)) if v is not None and v < low]
    if bad:
        raise UserError(f"{', '.join(bad)}: --workers must be >= 0, --cpus-per-worker >= 1 and "
                        "--gpus-per-worker >= 0")


def _cmd_synth(args) -> int:
    from cmkg.data import synthesize

    if args.num < 1 or not 16 <= args.size <= 1024:
        raise UserError(f"--num must be >= 1 and --size in [16, 1024] (got {args.num}, {args.size})")
    if abs(sum(args.split) - 1) > 1e-6 or min(args.split) < 0:
        raise UserError(f"--split must be three non-negative fractions summing to 1, got {args.split}")
    m = synthesize(args.out, args.domain, args.num, args.size, args.seed, tuple(args.split))
    print(json.dumps({"out": str(args.out), "num": m["num"], "fingerprint": m["fingerprint"],
                      "splits": {k: v["num"] for k, v in m["splits"].items()}}))
    return 0


def _summary(cfg, stage: str) -> str:
    """Test metrics of the stage and its inputs, side by side."""
    from cmkg.stages import Store, plan, stage_datasets

    store = Store.of(cfg)
    rows = []
    for node in plan(stage, cfg):
        name, art = node.stage, store.get(node.stage, node.key)
        if art is None:
            continue
        metrics, spec = art.metrics, art.meta["spec"]
        t, base = metrics["test"], metrics.get("mean_pose_test", {})
        test_set = stage_datasets(name, cfg)[0]
        rows.append((name, spec["arch"], spec["modality"], test_set.path or test_set.domain,
                     f"{t['epe_mm']:.2f}", f"{t['auc_20_50']:.3f}",
                     f"{base['epe_mm']:.2f}" if base else "-", store.describe(name, art.key)))
    head = ("stage", "backbone", "input", "test set", "EPE mm", "AUC 20-50", "mean-pose EPE",
            "artifact")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [head, *rows])


def _cmd_tune(args) -> int:
    from cmkg.cluster.tune import run_tune

    summary = run_tune(args.space, args.config, _overrides(args), resume=args.resume,
                       storage=args.storage, address=args.address, trials=args.trials,
                       time_budget_s=args.time_budget, cpus_per_worker=args.cpus_per_worker,
                       gpus_per_worker=args.gpus_per_worker)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_train(args) -> int:
    from cmkg.stages import run_stage

    _check_resources(args)
    cfg = _load_config(args)
    if args.workers == 0:
        run_stage(args.stage, cfg)
    else:
        from cmkg.cluster.train import run_stage_ray

        run_stage_ray(args.stage, cfg, workers=args.workers,
                      gpus_per_worker=args.gpus_per_worker, address=args.address)
    print(_summary(cfg, args.stage))
    return 0


def _ablation_files(args) -> list[str]:
    if args.command == "ablate":
        return args.ablation
    folder = Path(args.ablations) if args.ablations else Path(__file__).resolve().parent.parent / "ablations"
    files = sorted(str(p) for p in folder.glob("table*.yaml"))
    if not files:
        raise UserError(f"--ablations {folder}: no table*.yaml ablation files there")
    return files


def _cmd_ablate(args) -> int:
    """ablate, reproduce: the tables; reproduce then the phi diagnostics (``_phi_step``)."""
    from cmkg import ablation

    _check_resources(args)
    overrides = _overrides(args)
    phi_seeds = getattr(args, "phi_seeds", 0)  # reproduce only
    if phi_seeds < 0:
        raise UserError(f"--phi-seeds must be >= 0 (0 skips the phi diagnostics), got "
                        f"{phi_seeds}")
    if args.predict and not args.dry_run:
        raise UserError("--predict goes with --dry-run: it plans, it trains nothing")
    files = _ablation_files(args)
    report_dir = args.report or _default_report(args.config, overrides)
    if phi_seeds:  # its checks and overwrite guard before the tables train anything
        _phi_step(args, overrides, report_dir, check_only=True)
    status = ablation.run(files, args.config, overrides, seeds=args.seeds,
                          choice_seeds=args.choice_seeds, dry=args.dry_run,
                          report_dir=report_dir, force=args.force, address=args.address,
                          cpus_per_worker=args.cpus_per_worker,
                          gpus_per_worker=args.gpus_per_worker, workers=args.workers,
                          predict=args.predict)
    if phi_seeds:
        status = max(status, _phi_step(args, overrides, report_dir))
    return status


def _phi_step(args, overrides: list[str], report_dir: str, check_only: bool = False) -> int:
    """``cmkg reproduce``'s phi diagnostics: ``cmkg phi`` on seeds 0..--phi-seeds-1 with the
    tables' config, store, resources, report folder and --force (``check_only``: only its
    checks, ``phi.preflight``). Its errors say how to skip it."""
    from cmkg.ablation import phi

    try:
        if check_only:
            phi.preflight(args.config, overrides, seeds=args.phi_seeds, report_dir=report_dir,
                          force=args.force, workers=args.workers)
            return 0
        if args.dry_run:
            print("then the phi diagnostics (--phi-seeds), their stages as the store holds them "
                  "now: those the tables plan too (on the seeds both use: Table 2's meta stage, "
                  "the teacher, the student) are trained by the tables first")
        return phi.run(args.config, overrides, seeds=args.phi_seeds, report_dir=report_dir,
                       force=args.force, address=args.address,
                       cpus_per_worker=args.cpus_per_worker,
                       gpus_per_worker=args.gpus_per_worker, workers=args.workers,
                       dry=args.dry_run)
    except UserError as e:
        raise UserError(f"{e} (the phi diagnostics of cmkg reproduce; --phi-seeds 0 skips "
                        "them)") from e


def _default_report(config_name: str | None, overrides: list[str]) -> str:
    """``{store}/reports/{preset}``: a run's report stays beside its artifacts (in the local
    mirror of a remote store), never in the committed ``reports/`` unless asked."""
    from cmkg import ablation, config
    from cmkg.stages import Store

    store = Store.of(config.load(config_name, overrides))
    return str(store.root / "reports" / (ablation.preset_of(config_name) or "custom"))


def _cmd_phi(args) -> int:
    from cmkg.ablation.phi import run

    _check_resources(args)
    overrides = _overrides(args)
    return run(args.config, overrides, seeds=args.seeds,
               report_dir=args.report or _default_report(args.config, overrides),
               force=args.force, permutations=args.permutations, address=args.address,
               cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
               workers=args.workers, dry=args.dry_run)


def _cmd_report(args) -> int:
    if args.mode == "tune":
        from cmkg.cluster.tune_results import report_tune

        if not args.sweep:
            raise UserError("cmkg report tune: name the sweep folder ({run.store}/_tune/NAME)")
        for path in report_tune(args.sweep, storage=args.storage, report=args.report):
            print(path)
        return 0
    from cmkg.report import render_reports

    out = Path(args.report or "reports")
    for path in render_reports(Path(args.results) if args.results else out / "results", out):
        print(path)
    return 0


def _cmd_runs(args) -> int:
    return {"ls": _cmd_runs_ls, "show": _cmd_runs_show, "diff": _cmd_runs_diff,
            "gc": _cmd_runs_gc}[args.runs_command](args)


def _runs_store(args) -> tuple[str, str | None]:
    """(run.store, run.cache) of ``--store`` / ``--config``."""
    from cmkg import config

    run = config.load(args.config).run
    return args.store or run.store, run.cache


def _cmd_runs_ls(args) -> int:
    """The table; an empty or missing store says so and succeeds (nothing trained yet is no
    error), after checking --stage and --where all the same."""
    from cmkg import runs

    store = _runs_store(args)[0]
    entries = runs.index(store, missing_ok=True)
    selected = runs.select(entries, stage=args.stage, where=args.where, seed=args.seed)
    print(runs.format_table(selected) if entries else f"no artifacts in {store} yet")
    return 0


def _cmd_runs_show(args) -> int:
    from cmkg import runs

    store, cache = _runs_store(args)
    entries = runs.index(store)
    entry = runs.find(entries, args.key)
    refs, problems = runs.references(runs.reference_files(runs.local_root(store, cache),
                                                          args.report))
    print(runs.format_show(entry, entries, refs, problems))
    return 0


def _cmd_runs_diff(args) -> int:
    from cmkg import runs

    entries = runs.index(_runs_store(args)[0])
    print(runs.format_diff(*(runs.find(entries, k) for k in args.keys)))
    return 0


def _cmd_runs_gc(args) -> int:
    from cmkg import runs

    runs.gc(_runs_store(args)[0], args.report, dry_run=args.dry_run)
    return 0


def _load_npy(path: str, name: str):
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--{name} {path}: file not found")
    try:
        return np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"--{name} {path}: not a readable .npy array ({e})") from None


def _cmd_eval(args) -> int:
    from cmkg.metrics import pose_metrics

    pred, gt = _load_npy(args.pred, "pred"), _load_npy(args.gt, "gt")
    vis = _load_npy(args.vis, "vis") if args.vis else None
    if pred.ndim != 3 or pred.shape[1:] != (21, 3):
        raise UserError(f"--pred {args.pred}: expected shape (N, 21, 3), got {pred.shape}")
    if gt.shape != pred.shape:
        raise UserError(f"--gt {args.gt}: shape {gt.shape} differs from --pred {pred.shape}")
    if vis is not None and vis.shape != pred.shape[:2]:
        raise UserError(f"--vis {args.vis}: expected shape {pred.shape[:2]}, got {vis.shape}")
    if args.root_relative:
        pred, gt = pred - pred[:, :1], gt - gt[:, :1]
    try:
        out = pose_metrics(pred, gt, vis)
    except ValueError as e:
        raise UserError(f"--vis {args.vis}: {e}") from None
    print(json.dumps(out, indent=2))
    return 0


def _cmd_figure(args) -> int:
    from cmkg.report import fig5_from_artifacts

    fig5_from_artifacts(args.without, args.with_, args.prior, args.out)
    print(args.out)
    return 0


def _cmd_config_show(args) -> int:
    import yaml

    print(yaml.safe_dump(_load_config(args).to_dict(), sort_keys=False), end="")
    return 0


TRACKED = ("train", "ablate", "reproduce", "tune")  # commands with a parent run (run.tracking)


def _tracked(handler, args) -> int:
    """``handler(args)``; a training command whose config sets ``run.tracking`` runs inside
    one parent run (``cmkg.tracking.command``) that its stages', and a sweep's trials', runs
    nest under, ended FAILED when the command fails."""
    if args.command not in TRACKED or getattr(args, "dry_run", False):
        return handler(args)
    from cmkg import config, tracking

    cfg = config.load(args.config, _overrides(args))
    if cfg.run.tracking.backend == "none":
        return handler(args)
    from cmkg.stages import Store

    what = ([args.stage] if args.command == "train" else [Path(args.space).stem]
            if args.command == "tune" else [Path(a).stem for a in getattr(args, "ablation", [])])
    name = " ".join(["cmkg", args.command, *what])
    with tracking.command(cfg, Store.of(cfg).root, name, {"preset": args.config}) as run:
        status = handler(args)
        if status and run is not None:
            run.status = "FAILED"
        return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"data": _cmd_data, "train": _cmd_train, "tune": _cmd_tune,
                "ablate": _cmd_ablate, "reproduce": _cmd_ablate, "report": _cmd_report,
                "runs": _cmd_runs, "eval-predictions": _cmd_eval, "phi": _cmd_phi,
                "figure": _cmd_figure, "config": _cmd_config_show}
    try:
        return _tracked(handlers[args.command], args)
    except Exception as e:  # a UserError: raised here, in a Ray task or in a Ray Train worker
        from cmkg.errors import unwrap_user_error

        err = unwrap_user_error(e)
        if err is None:
            raise  # a crash keeps its traceback (and exit status 1)
        print(f"cmkg: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("cmkg: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
