"""`dlrm preprocess`: the driver, its workers' passes, staging, counting and merging
vocabularies, the rows they are counted on, shards, the timeline, the disk check, and
what the manifest records."""
