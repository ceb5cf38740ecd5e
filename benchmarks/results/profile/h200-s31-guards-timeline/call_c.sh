# Session 31, call C (HEAD 8ff11b8): call B's default and use_recursive_dict_tags_for_guards=1 again, alternating,
# on the warm caches, to see how much of their difference is the process.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
cd benchmarks
i=0
for variant in "--dynamo use_recursive_dict_tags_for_guards=1" default "--dynamo use_recursive_dict_tags_for_guards=1" default; do
  s=$SECONDS; i=$((i+1)); name=$i$(echo "$variant" | tr -c 'a-z0-9\n' '_')
  args=$([ "$variant" = default ] || echo "$variant")
  timeout $((590 - SECONDS)) python3 profile_step_timeline.py --batch 1 --prompt 330 $args > "$OUT/timeline_$name.log" 2>&1
  echo "== $variant exit $? $((SECONDS-s))s"; grep -v -i warn "$OUT/timeline_$name.log" | grep -E "forward -> runtime|decode step|replay on|eager" | cut -c1-200
done
