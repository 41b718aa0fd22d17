// Starts Swagger UI on /api/docs (served by http_api/routes/docs.py). A file of its own:
// the page's CSP allows no inline script.
/* global SwaggerUIBundle */
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: "/api/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null, // the default sends the document to an outside validator
  });
});
