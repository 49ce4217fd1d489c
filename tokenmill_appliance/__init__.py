"""The appliance: portal, boot and supervisor programs around the tokenmill server.

It reaches the engine only over HTTP and the process table; it never imports `tokenmill` or torch.
"""
