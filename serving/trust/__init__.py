"""The trust loop: the query log, human review, feedback export, `moe stats` and proposed experts."""
