"""Executors own the workers: in-process for one device (`inprocess`), Ray for more
(`ray_executor`); `factory.create_executor` picks one."""
