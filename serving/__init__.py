"""The HTTP side: settings, request schemas, the queue and its GPU worker, errors, auth, body limits and the
routers that `api.create_app` assembles. Every route reaches the GPU through the one worker."""
