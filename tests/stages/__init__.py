"""Stage tests: one stage of pipelines/ in process (its functions or its CLI), real local Ray for distill and tune."""
