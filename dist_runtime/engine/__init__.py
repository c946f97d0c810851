"""The engine: one thread owning the scheduler, block manager, executor and output processing.

Every caller (generate, stream, chat, ask, the job runner) adds requests and reads handles.
"""
