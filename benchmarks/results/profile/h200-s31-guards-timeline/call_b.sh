# Session 31, call B (HEAD 8ff11b8): where a batch-1 decode step's host time goes on the GPU machine's torch, with
# Dynamo's guards as they are and with some left out (one process each; the first compiles, the others hit the caches).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
cd benchmarks
for variant in default "--guard-filter skip_shape_guards_unsafe" "--guard-filter keep_tensor_guards_unsafe" "--dynamo use_recursive_dict_tags_for_guards=1"; do
  s=$SECONDS; name=$(echo "$variant" | tr -c 'a-z0-9\n' '_')
  args=$([ "$variant" = default ] || echo "$variant")
  timeout $((590 - SECONDS)) python3 profile_step_timeline.py --batch 1 --prompt 330 $args > "$OUT/timeline_$name.log" 2>&1
  echo "== $variant exit $? $((SECONDS-s))s"; grep -v -i warn "$OUT/timeline_$name.log" | grep -E "\||ms|graphs|torch" | tail -16 | cut -c1-200
done
