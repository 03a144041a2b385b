"""Code shared by every stage: settings, topology, schemas, worker runtime, metrics, logging."""
