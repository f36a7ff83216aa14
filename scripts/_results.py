"""What every results script writes: ``<out>.json`` (the numbers) and ``<out>.md`` (the
table scripts/update_readme.py copies into the README and docs/)."""

import json
import os


def write_results(out, res, markdown):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(markdown.rstrip("\n") + "\n")
    print(markdown)
