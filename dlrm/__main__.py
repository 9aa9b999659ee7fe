from dlrm.cli import entry

entry()
