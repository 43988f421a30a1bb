"""The ``actavatar`` command line. Each sub-command lives in the module that does the work; this file only
dispatches, so ``actavatar --help`` stays fast and a missing optional dependency only breaks its own command.
``synth``, ``train`` and ``bench method`` live in the research harness ``actavatar_lab`` (beside the engine, not
part of the ComfyUI pack's imports); without it they exit with status 2 and say so."""

from __future__ import annotations

import importlib
import sys

#: The research harness's package (synthetic data, evaluation, the mini recipe).
LAB = "actavatar_lab"
#: sub-command -> (module with ``main(argv) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("actavatar_core.pipeline_cli", "generate a talking-avatar MP4 from an image, audio and a phase script"),
    "demo": ("actavatar_core.pipeline_cli", "generate the bundled example with the embedded default model"),
    "synth": ("actavatar_lab.synth.cli", "write a synthetic talking-character dataset"),
    "train": ("actavatar_lab.train_cli", "two-stage ActAvatar training from a config file"),
    "bench": ("actavatar_core.bench", "benchmarks: 'bench paca' (attention cost), 'bench method' (ablation table)"),
    "export": ("actavatar_core.export", "write a model folder as ComfyUI model files (diffusion_models/, vae/, ...)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: actavatar <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<9} {help_text}")
        print("\nRun 'actavatar <command> --help' for the options of one command.")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"actavatar: unknown command '{name}'. Choose one of: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    return run_module(COMMANDS[name][0], [name, *rest], name)


def run_module(module_name: str, argv: list[str], command: str) -> int:
    """Run ``module_name.main(argv)``; a command of the research harness exits with status 2 and a hint when
    ``actavatar_lab`` is not installed (a ComfyUI install carries only the engine)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if not (missing == LAB or missing.startswith(LAB + ".")) or not module_name.startswith(missing):
            raise  # a dependency of the harness is missing, not the harness: its own message says which
        print(f"actavatar {command}: this command is part of ActAvatar's research harness "
              f"('{LAB}'), which is not installed here. Fix: install the repository with pip "
              "(pip install -e .), which installs actavatar_core and actavatar_lab together, or run from a clone "
              "of it.", file=sys.stderr)
        return 2
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
