"""Registers the retrieval task with the harness."""

from harness.tasks import TASKS
from tasks.retrieval.task import RetrievalTask

if "retrieval" not in TASKS:
    TASKS.register("retrieval", RetrievalTask())
