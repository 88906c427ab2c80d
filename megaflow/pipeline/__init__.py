"""The stage runner behind `megaflow run`: DAG of stages, artifact hashing, resume, report (roadmap)."""
