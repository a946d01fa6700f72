'use strict';
// Direct method scenario: the device registers client.onDeviceMethod(args.method)
// (event `registered`) and answers args.count calls with status args.status
// and the payload {"done": args.method, "request": <the call's payload>}:
// event `method` per call received, `answered` per answer sent.
const { call, connect, emit, main } = require('./common');

main(async (args) => {
  const client = await connect(args);
  await new Promise((resolve, reject) => {
    let answered = 0;
    client.onDeviceMethod(args.method, (request, response) => {
      emit('method', { name: request.methodName, payload: request.payload, requestId: request.requestId });
      const payload = { done: request.methodName, request: request.payload };
      call((done) => response.send(args.status, payload, done)).then(() => {
        emit('answered', { status: args.status, payload });
        answered += 1;
        if (answered >= args.count) resolve();
      }, reject);
    });
    emit('registered', { method: args.method });
  });
  await client.close();
});
