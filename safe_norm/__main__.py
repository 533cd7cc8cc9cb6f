"""``python -m safe_norm audit PATH | demo | upstream-patch``."""

from __future__ import annotations

import argparse
import sys

from torch import nn

from . import _checkpoint, _demo, _inspect
from ._patch import format_series, series, write_series


def _audit(args: argparse.Namespace) -> int:
    obj = _checkpoint.load(args.path, unsafe_pickle=args.unsafe_pickle)
    if isinstance(obj, nn.Module):  # only from --unsafe-pickle: the live classes tell more
        rows = _inspect.audit(obj, exact=not args.no_exact)
    else:  # anything that is not a (nested) mapping of tensors holds no spectral norm
        rows = _checkpoint.audit_state_dict(obj, exact=not args.no_exact)
    if not rows:
        raise _checkpoint.CheckpointError(
            f"{args.path}: no spectral norm found (looked for <name>_orig/_u/_v and "
            "parametrizations.<name>.original/<i>._u/._v)"
        )
    print(rows)
    untrained = sum(1 for r in rows if r.untrained)
    if untrained:
        print(f"\n{untrained} layer(s) never trained: their sigma comes from unconverged u, v "
              "(PyTorch issue #51800); safe_norm.convert(model) after loading warms them up.")
    return 0


def _upstream_patch(args: argparse.Namespace) -> int:
    patches = series(args.torch_root, args.tree)
    if args.output_directory:
        for path in write_series(patches, args.output_directory):
            print(path)
    else:
        sys.stdout.write(format_series(patches))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safe_norm", description="safe_norm tools")
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser("audit", help="the spectral norms in a checkpoint: sigma used, exact, error")
    audit.add_argument("path", help="a torch.save file: a state_dict, or a dict holding some")
    audit.add_argument("--unsafe-pickle", action="store_true",
                       help="allow arbitrary pickled objects (whole modules); runs code from the file")
    audit.add_argument("--no-exact", action="store_true", help="skip the exact sigma (SVD), for huge layers")
    commands.add_parser("demo", help="PyTorch issue #51800 side by side (options: --plot PATH, --steps N)",
                        add_help=False)
    patch = commands.add_parser(
        "upstream-patch", help="print the reference patch series for PyTorch (git format-patch style)")
    patch.add_argument("--tree", metavar="PATH",
                       help="a PyTorch checkout: adds the test patch, against its test/ files")
    patch.add_argument("--torch-root", metavar="PATH",
                       help="where torch/nn/utils/ lies for the source patches: a checkout, or a "
                            "site-packages directory (default: the installed torch's)")
    patch.add_argument("-o", "--output-directory", metavar="DIR",
                       help="write one NNNN-subject.patch file per patch there instead of printing")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        return _demo.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "audit":
            return _audit(args)
        return _upstream_patch(args)
    except (_checkpoint.CheckpointError, RuntimeError) as e:
        print(f"safe_norm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
