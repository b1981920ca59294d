// Renders the OpenAPI document with the vendored Swagger UI. "Authorize"
// takes an API key (svm_…) and "Try it out" sends calls with it. The key
// stays in this page's memory: persistAuthorization would keep it in
// localStorage, which outlives the tab.
window.addEventListener('DOMContentLoaded', () => {
  window.ui = window.SwaggerUIBundle({
    url: '/openapi.json',
    dom_id: '#swagger-ui',
    deepLinking: true,
    // No call to the public validator service: nothing leaves the server.
    validatorUrl: null,
    persistAuthorization: false,
    displayRequestDuration: true,
    defaultModelsExpandDepth: 0,
    docExpansion: 'list',
    filter: true,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: 'BaseLayout',
  });
});
