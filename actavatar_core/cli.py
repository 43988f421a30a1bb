"""The ``actavatar`` command line. Each sub-command lives in the module that does the work; this file only
dispatches, so ``actavatar --help`` stays fast and a missing optional dependency only breaks its own command."""

from __future__ import annotations

import importlib
import sys

#: sub-command -> (module with ``main(argv) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("actavatar_core.pipeline_cli", "generate a talking-avatar MP4 from an image, audio and a phase script"),
    "demo": ("actavatar_core.pipeline_cli", "generate the bundled example with the embedded default model"),
    "synth": ("actavatar_core.synth.cli", "write a synthetic talking-character dataset"),
    "train": ("actavatar_core.training.cli", "two-stage ActAvatar training from a config file"),
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
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main([name, *rest]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
