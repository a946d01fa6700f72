'use strict';
// Twin scenario: runs args.steps in order on one device client.
//   {"op": "get"}                 client.getTwin(): event `twin` {desired, reported, ms}
//   {"op": "patch", "patch": {}}  twin.properties.reported.update(): event `patched`
//   {"op": "desired", "until": k} twin.on('properties.desired'): event `desired`
//                                 for each, until one carries key k; event
//                                 `listening` once the handler is set and a
//                                 GET made after it was answered (the hub
//                                 takes a connection's packets in order, so
//                                 the SDK's SUBSCRIBE was taken by then)
const { call, connect, emit, main } = require('./common');

function plain(o) {
  // reported carries the SDK's update() function: JSON drops it
  return JSON.parse(JSON.stringify(o));
}

main(async (args) => {
  const client = await connect(args);
  let twin = null;
  for (const step of args.steps) {
    if (step.op === 'get') {
      const t0 = Date.now();
      twin = await client.getTwin();
      emit('twin', { desired: plain(twin.properties.desired), reported: plain(twin.properties.reported), ms: Date.now() - t0 });
    } else if (step.op === 'patch') {
      await call((done) => twin.properties.reported.update(step.patch, done));
      emit('patched', { patch: step.patch });
    } else if (step.op === 'desired') {
      await new Promise((resolve, reject) => {
        twin.on('properties.desired', (desired) => {
          emit('desired', { desired: plain(desired) });
          if (desired && Object.prototype.hasOwnProperty.call(desired, step.until)) resolve();
        });
        client.getTwin().then(() => emit('listening'), reject);
      });
    } else {
      throw new Error(`unknown step ${JSON.stringify(step)}`);
    }
  }
  await client.close();
});
