"""dove-vlm's lmms-eval task folders (`dove_shapes_vqa`, `dove_shapes_vqa_mc`), shipped inside the package.

lmms-eval finds tasks by folder (`--include_path`, `TaskManager(include_path=...)`), so the folders travel
as package data and `TASKS_DIR` names them wherever dove-vlm is installed:

    python -m lmms_eval --include_path "$(python -c 'import dove_vlm.lmms_tasks as t; print(t.TASKS_DIR)')" ...
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
