# Sourced by ddp_agreement.sh and fsdp_agreement.sh (with W = work folder, STEPS = steps per stage): paths, a
# teacher with SmolLM2-135M's config + tokenizer and random weights (TEACHER_SRC), and `recipe OUT DIST [INPUT3]`,
# which prints a recipe: global batch 16 sequences x 512 tokens of pydoc topics (offline), bf16, stages 1-3
# (every:4); DIST = ddp | fsdp; INPUT3 = the folder stage 3 starts from (default: this run's stage 2); EXTRA = more
# `defaults` entries (e.g. "cuda_graph: true").
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  TRITON_CACHE_AUTOTUNING=1
rm -rf "$W"; mkdir -p "$W"
python scripts/gpu/make_random_teacher.py "${TEACHER_SRC:-.carry/smol}" "$W/teacher"
recipe() {
cat <<YAML
name: $(basename "$W")_check
teacher: $W/teacher
output_dir: $1
placement: every:4
precision: bf16
distributed: $2
data: {sources: [{type: pydoc}], text_mode: pack, max_length: 512, shuffle: true}
defaults: {steps: $STEPS, seq_len: 512, batch_size: 16, micro_batch_size: 8, log_every: 1, save_every: 1000${EXTRA:+, $EXTRA}}
stages: {1: {lr: 1.0e-3}, 2: {lr: 5.0e-4}, 3: {lr: 5.0e-5, loss: {positions: all}${3:+, input: $3}}}
YAML
}
