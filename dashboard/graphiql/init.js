// GraphiQL on /graphql, every asset served by Reservoir itself (no CDN).
// Subscriptions go over the same URL (graphql-transport-ws); the WebSocket authenticates
// with the Authorization header typed into GraphiQL's header editor.
(function () {
  var http = window.location.origin + '/graphql';
  var ws = (window.location.protocol === 'https:' ? 'wss://' : 'ws://') + window.location.host + '/graphql';
  function authorization() {
    try {
      var headers = JSON.parse(window.localStorage.getItem('graphiql:headers') || '{}');
      return headers.Authorization || headers.authorization || undefined;
    } catch (e) {
      return undefined;
    }
  }
  var wsClient = window.graphqlWs.createClient({
    url: ws,
    lazy: true,
    connectionParams: function () {
      var value = authorization();
      return value ? { authorization: value } : {};
    },
  });
  var fetcher = window.GraphiQL.createFetcher({ url: http, wsClient: wsClient });
  var root = window.ReactDOM.createRoot(document.getElementById('graphiql'));
  root.render(
    window.React.createElement(window.GraphiQL, {
      fetcher: fetcher,
      defaultEditorToolsVisibility: true,
      defaultHeaders: '{"Authorization": "Bearer <token>"}',
      defaultQuery:
        '# Set the Authorization header below (the demo token is printed at start-up), then run.\n' +
        '# Live balances: subscription { balanceChanged(workspaceId: "…") { balance available cause } }\n' +
        '{\n' +
        '  viewer {\n' +
        '    accounts { name totalBalance workspaces { id name balance reserved available } }\n' +
        '  }\n' +
        '}\n',
    }),
  );
})();
