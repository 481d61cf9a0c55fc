"""The server's routers, one module per group of routes; they only validate and delegate."""

from fovea.serve._routes import admin, data, labels, metrics, oip, predict, similar, web

# In the order the OpenAPI document lists them.
ROUTERS = [predict.router, similar.router, oip.router, labels.router, data.router, web.router, admin.router,
           metrics.router]
