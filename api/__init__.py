"""genq's HTTP API: the Flask app factory, the `/v1` blueprints, authentication, problem
responses and the OpenAPI document.

Importing `api` loads neither torch nor ray: it validates parameters with the families'
pydantic specs and hands job ids to the broker through `scheduler.enqueue`.
"""
