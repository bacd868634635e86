// enginetime from Node: one request's accounting and the shards' status over gRPC.
//
//   npm install @grpc/grpc-js @grpc/proto-loader
//   node get_request.js PROTO_ROOT HOST:PORT REQUEST_ID
//
// PROTO_ROOT is the folder that holds enginetime/v1/*.proto: proto/ in the repository,
// or the site-packages folder of a Python environment where enginetime is installed.
// Prints one JSON object: {"request": RequestAccounting, "shards": [ShardStatus, ...]}.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [protoRoot, target, requestId] = process.argv.slice(2);
if (!protoRoot || !target || !requestId) {
  console.error("usage: node get_request.js PROTO_ROOT HOST:PORT REQUEST_ID");
  process.exit(2);
}

const definition = protoLoader.loadSync("enginetime/v1/accounting.proto", {
  includeDirs: [path.resolve(protoRoot)], // imports are relative to this root
  keepCase: true, // field names as in the .proto (engine_time_ns, not engineTimeNs)
  longs: String, // 64-bit integers as decimal strings: no precision lost
  enums: String, // REQUEST_STATE_FINISHED rather than 4
  defaults: true, // zero values present (shard 0, interference 0)
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).enginetime.v1;
const client = new v1.AccountingService(target, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 5000);

client.GetRequest({ request_id: requestId }, { deadline: deadline() }, (err, resp) => {
  if (err) {
    // NOT_FOUND names the id; UNAVAILABLE means no sidecar answered at target.
    console.error(`GetRequest failed: ${grpc.status[err.code]}: ${err.details}`);
    process.exit(1);
  }
  client.GetShards({}, { deadline: deadline() }, (err2, shards) => {
    if (err2) {
      console.error(`GetShards failed: ${grpc.status[err2.code]}: ${err2.details}`);
      process.exit(1);
    }
    console.log(JSON.stringify({ request: resp.request, shards: shards.shards }));
    client.close();
  });
});
