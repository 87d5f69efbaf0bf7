"""Workers: RQ tasks and every tensor. Loads models once per process and runs job kinds."""
