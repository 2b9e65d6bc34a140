"""Operating the factory: a local Prefect server + worker, demo model preparation."""
