#!/usr/bin/env bash
# Writes actavatar_core/assets/demo/speech.wav, the bundled example's speech: a real text-to-speech recording
# (Festival's CMU US SLT HTS voice, a female US English speaker the mini model never heard in training), trimmed of
# silence, led in by 0.12 s and cut to 3.08 s (77 frames at 25 fps), 16 kHz mono 16-bit.
# Needs: apt-get install festival festvox-us-slt-hts sox
set -euo pipefail
out="${1:-$(dirname "$0")/../actavatar_core/assets/demo/speech.wav}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "Hi there! I'm glad you came. Watch this." > "$tmp/text.txt"
text2wave -eval "(voice_cmu_us_slt_arctic_hts)" "$tmp/text.txt" -o "$tmp/raw.wav" -F 16000
sox "$tmp/raw.wav" "$tmp/trim.wav" silence 1 0.02 0.5% reverse silence 1 0.02 0.5% reverse
sox "$tmp/trim.wav" -r 16000 -c 1 -b 16 "$out" pad 0.12 0.5 trim 0 3.08
echo "wrote $out ($(soxi -D "$out") s)"
