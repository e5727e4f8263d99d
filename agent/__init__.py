"""The edge agent: joins a coordinator, runs pinned training workers, reports metrics."""
