"""Summarise a `py-spy record --native -f raw` profile of `profile_step_timeline.py`: the samples inside Dynamo's
compiled-frame call but outside compilation and outside KIVI's runtime (the "forward -> runtime" span), by the
innermost frame. Usage: python summarize_dynamo_span.py PROFILE.txt"""

import collections
import re
import sys

leaves: collections.Counter[str] = collections.Counter()
in_guard_tree = 0
total = 0
for line in open(sys.argv[1]):
    stack, count = line.rstrip().rsplit(" ", 1)
    frames = stack.split(";")
    entry = [i for i, frame in enumerate(frames) if "compile_wrapper" in frame]
    if not entry or any("convert_frame.py" in f or "compile_fx" in f or "kivi_compile/runtime.py" in f for f in frames):
        continue
    inner = frames[entry[0] + 1 :]
    total += int(count)
    in_guard_tree += int(count) * any("RootGuardManager" in frame for frame in inner)
    leaves[re.sub(r" \(.*", "", inner[-1])[:90] if inner else "-"] += int(count)
print(f"samples in the span: {total}; under the C++ guard tree (RootGuardManager): {in_guard_tree}")
for leaf, count in leaves.most_common(20):
    print(f"{count:6d}  {leaf}")
