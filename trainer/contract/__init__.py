"""The api <-> trainer contract (docs/architecture.md, "The contract"): the run spec, the callback
events, the execution environment a dispatcher hands a trainer, and the spool's file naming.

Both sides import this package and nothing else of each other: the api never imports the trainer's
torch-heavy modules, so everything here imports nothing heavier than pydantic
(tests/trainer/contract/test_contract_imports.py checks it).
"""
