"""The server's routers, one module per group of routes; they only validate and delegate."""

from fovea.serve._routes import admin, labels, metrics, oip, predict, web

# In the order the OpenAPI document lists them.
ROUTERS = [predict.router, oip.router, labels.router, web.router, admin.router, metrics.router]
