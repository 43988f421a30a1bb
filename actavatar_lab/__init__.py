"""ActAvatar's research harness, kept out of the engine so that the ComfyUI pack and the ``actavatar_core`` engine
carry only what generation needs. It holds what the mini-model experiment uses to make and judge models:

- ``synth``: the procedural talking-character dataset (``actavatar synth``) and its analytic detectors and metrics;
- ``recipe``: the mini recipe (the mini model's encoders from scratch, its stand-in VAE stages, the whole run) on the
  engine's generic training (:mod:`actavatar_core.training`); ``train_cli`` is ``actavatar train``;
- ``evaluation``: ``actavatar bench method`` (held-out synthetic evaluation per PACA mode, the ablation benches);
- ``configs/mini.json``: the shipped mini model's training config.

It imports the engine; the engine imports it only where the ``actavatar`` command dispatches into it. Nothing under
``nodes/`` or the pack root imports it.
"""
