"""Print what a demo user wants to see: the champion, its test accuracy, and one SQL answer."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_settings  # noqa: E402
from pipeline.db import Database  # noqa: E402


def main() -> int:
    settings = load_settings()
    db = Database(settings.mysql)
    model = settings.model_name
    champion = db.query(
        "SELECT to_version, moved_at, reason FROM alias_history "
        "WHERE model_name = %s AND alias = 'champion' ORDER BY id DESC LIMIT 1",
        (model,),
    )
    if not champion:
        print(
            f"no champion for {model!r}: the gate promoted nothing (see .local/logs/demo-dag.log)"
        )
        return 1
    version = champion[0]["to_version"]
    print(
        f"champion: {model} version {version} (promoted {champion[0]['moved_at']}: {champion[0]['reason']})"
    )
    query = (
        "SELECT model_version, alias, n_labelled, accuracy, macro_f1 "
        "FROM v_accuracy_by_model_version WHERE model_name = %s ORDER BY model_version, alias"
    )
    print(f"\nSQL> {query.replace('%s', repr(model))};")
    rows = db.query(query, (model,))
    print(
        f"{'model_version':>13}  {'alias':<10}  {'n_labelled':>10}  {'accuracy':>8}  {'macro_f1':>8}"
    )
    for r in rows:
        macro_f1 = "" if r["macro_f1"] is None else f"{float(r['macro_f1']):.4f}"
        print(
            f"{r['model_version']:>13}  {r['alias'] or '':<10}  {r['n_labelled']:>10}"
            f"  {float(r['accuracy']):8.4f}  {macro_f1:>8}"
        )
    test = next((r for r in rows if str(r["model_version"]) == str(version)), None)
    if test is not None:
        print(
            f"\ntest accuracy of the champion (v{version}): {float(test['accuracy']):.2%}"
            f" on {test['n_labelled']} labelled images"
        )
    inbox = db.query(
        "SELECT COUNT(*) AS n FROM v_inbox_latest_predictions WHERE model_name = %s", (model,)
    )[0]["n"]
    print(f"inbox images with a prediction: {inbox} (SELECT * FROM v_inbox_latest_predictions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
